"""ChatLearn's `chatlearn.runtime` (its engine, environment, trainer and evaluator modules, as
`from chatlearn.runtime.trainer import Trainer`) is not provided: importing it says what to use
instead, not a bare ModuleNotFoundError."""

raise ImportError(
    "chatlearn.runtime is not provided by this runtime: import Engine and DPOEngine from "
    "chatlearn; ChatLearn's Environment, Trainer and Evaluator flows are not provided "
    "(DPOEngine(reference, policy_trainer) builds its own; evaluation: "
    "engine.set_eval_dataset(samples) and the trainer's eval_step) (docs/chatlearn-compat.md)"
)
