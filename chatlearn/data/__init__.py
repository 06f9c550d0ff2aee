"""ChatLearn's `chatlearn.data` (its relay sample manager and stream dataset, as
`from chatlearn.data.data import RelaySampleManager`) is not provided: importing it says what to
do instead, not a bare ModuleNotFoundError."""

raise ImportError(
    "chatlearn.data is not provided by this runtime: there is no relay buffer or stream "
    "dataset; the reference's forward_step returns what train_step needs, and the trainer gets "
    "it in micro-batches of train_micro_batch_size (docs/chatlearn-compat.md)"
)
