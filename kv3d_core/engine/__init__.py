"""Session & scheduler layer: prompt rendering and the continuous-batching
scheduler that owns the execution backend and drives each session through its
life cycle (:mod:`kv3d_core.contracts.session`)."""
