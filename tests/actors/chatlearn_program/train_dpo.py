"""A DPO program written as ChatLearn's DPO guide and entry script write it, run unchanged.

    python train_dpo.py -c dpo.yaml RESULT_FILE     (with `data_path`, `output_dir` exported)

It reads its data path with `args.runtime_args._args_dict`, its reference has no `__init__`,
its trainer has the guide's `__init__(self, name)`, calls `self.tensor_model_parallel_size()` and
the other ChatLearn helpers, and builds an optimizer from `learning_rate: 5e-3` (YAML 1.1 would
give a string). The trainer writes what it saw to `output_dir/report.jsonl`; the main block writes
a JSON summary to RESULT_FILE.
"""

import json
import os
import sys

import torch

import chatlearn
from chatlearn import DPOEngine, TorchModule


class PolicyReference(TorchModule):
    def setup(self):
        torch.manual_seed(self.model_args["seed"])
        self.model = torch.nn.Linear(self.model_args["hidden_size"], 1)
        self.put("reference_rank", {"rank": self.get_data_parallel_rank(), "pid": os.getpid()})

    def validate(self):  # ChatLearn calls it after setup(), on every model
        self.put("reference_validated", {"model": hasattr(self, "model")})

    def build_dataset(self, train_prompts, is_eval=False):
        return [{"x": torch.tensor(p["x"], dtype=torch.float32)} for p in train_prompts]

    def forward_step(self, data, iteration):
        with torch.no_grad():
            return {"x": data["x"], "ref_logps": self.model(data["x"]).squeeze(-1)}


class PolicyTrainer(TorchModule):
    def __init__(self, name):
        super().__init__(name)
        self.steps = 0

    def init(self):  # ChatLearn calls it before setup()
        self.report(event="init", pid=os.getpid())

    def setup(self):
        torch.manual_seed(self.model_args["seed"])
        self.model = torch.nn.Linear(self.model_args["hidden_size"], 1)
        lr = self.model_args["learning_rate"]
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.report(
            event="setup",
            tp=self.tensor_model_parallel_size(),
            pp=self.pipeline_model_parallel_size(),
            dp=[self.get_data_parallel_rank(), self.get_data_parallel_size()],
            lr=self.optimizer.param_groups[0]["lr"],
            gpus=[self.total_gpu, self.gpu_per_process, self.num_gpu_per_replica],
            config_dir=self.config_dir,
            output_dir=self.runtime_args.output_dir,
            pid=os.getpid(),
            # ChatLearn's sub-configs, read as its trainers read them (model_provider)
            lora=[self.module_args.lora.enable_lora, self.enable_lora],
            lora_dim=self.module_args.lora.lora_dim,
            ranking=self.module_args.batch_generation.ranking,
            # what ChatLearn's helpers read without the module (its LoRA layer factory)
            active=chatlearn.get_args().active_module_args is self.module_args,
            active_lora=chatlearn.get_args().active_module_args.lora.enable_lora,
        )
        self._metric_prefix = "train"

    def validate(self):
        self.report(event="validate", optimizer=hasattr(self, "optimizer"))

    def train_step(self, data, iteration):
        if self.steps == 0:  # the reference has run its setup() by now
            self.report(
                event="get",
                reference=self.get("reference_rank"),
                validated=self.get("reference_validated"),
            )
        self.timers("train_step").start()
        loss = sum(((self.model(mb["x"]).squeeze(-1) - mb["ref_logps"]) ** 2).mean() for mb in data)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        self._metric_list.append({"reward_score": float(iteration), "n": len(data)})
        self._metric_list.append({"reward_score": float(iteration) + 1.0})
        self.timers("train_step").stop()
        return {"loss": float(loss)}

    def after_episode(self):
        _, times = self.timers.log(["train_step"], return_dict=True)  # ChatLearn's (text, dict)
        self.report(
            event="episode",
            steps=self.steps,
            timed=sorted(times),
            consumed_samples=self.runtime_args.consumed_samples,
        )

    def report(self, **record):
        os.makedirs(self.runtime_args.output_dir, exist_ok=True)
        with open(os.path.join(self.runtime_args.output_dir, "report.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    chatlearn.init()
    args = chatlearn.get_args()
    with open(args.runtime_args._args_dict["data_path"]) as f:
        train_prompts = [json.loads(line) for line in f]
    reference = PolicyReference("reference")
    policy = PolicyTrainer("policy")
    engine = DPOEngine(reference, policy)
    engine.set_dataset(train_prompts)
    engine.timers("learn").start()
    engine.learn()
    engine.timers("learn").stop()
    summary = engine.logging_summary()
    engine.stop()  # as ChatLearn's entry scripts end (the models have stopped already)
    with open(sys.argv[-1], "w") as f:
        json.dump(
            {
                "output_dir": args.runtime_args.output_dir,
                "coordinator_pid": os.getpid(),
                "summary": summary,
            },
            f,
        )
