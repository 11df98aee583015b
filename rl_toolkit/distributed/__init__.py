"""The distributed runtime: Ray start-up, the virtual cluster, worker groups, batched data.

Import from the submodules (`batched_data_dict`, `virtual_cluster`, `worker_groups`); nothing
is re-exported here, so that importing `BatchedDataDict` (data, losses) does not import Ray.
"""
