"""ChatLearn's `chatlearn.utils.future` (Ray futures) is not provided: importing it says why."""

raise ImportError(
    "chatlearn.utils.future is not provided by this runtime: there is no Ray here; engine and "
    "module calls return their values (docs/chatlearn-compat.md)"
)
