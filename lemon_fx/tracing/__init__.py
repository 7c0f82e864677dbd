"""Floor 1: from an ``nn.Module`` to a GraphModule with facts. ``frontend`` (``trace``: fx
first, torch.export as fallback), ``export_frontend``, and ``graph_facts``: every meta key
with its writer and readers. Tracing knows nothing of rules: what stays whole is a
predicate the caller passes."""
