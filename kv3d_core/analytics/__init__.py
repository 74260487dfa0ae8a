"""Workload analytics that need nothing of kv3d: miss-ratio curves (``mrc``) and windows
over cumulative metrics (``window``). The prefix layer feeds the first, the API the second."""
