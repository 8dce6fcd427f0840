"""``transformers.Trainer`` on an RMT, as ``tests/test_accelerate.py`` launches it: alone with the
global batch, or under ``accelerate launch`` with 2 CPU processes (gloo) and half the batch each.

``python tests/accelerate_worker.py OUT PER_DEVICE_BATCH CHECKPOINT_SEGMENTS``
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from models import VOCAB, tiny_gpt2  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

import rmt_fast  # noqa: E402
from rmt_fast.data import RMTDataCollator  # noqa: E402
from rmt_fast.distributed import destroy  # noqa: E402


def main(out: str, per_device: int, checkpoint_segments: bool) -> None:
    # a hang shows where it is (every thread's stack on stderr) and ends the rank in minutes,
    # not at the test's 600 s timeout; a run takes 10-60 s
    faulthandler.dump_traceback_later(240, exit=True)
    torch.set_num_threads(1)
    model = rmt_fast.RMTForCausalLM(tiny_gpt2(seed=0), num_mem_tokens=2, segment_size=8,
                                    checkpoint_segments=checkpoint_segments)
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(64):  # a copy: the second segment repeats the first, so memory matters
        half = torch.randint(3, VOCAB, (8,), generator=g)
        seq = torch.cat([half, half]).tolist()
        data.append({"input_ids": seq, "labels": seq})
    args = TrainingArguments(output_dir=out, max_steps=4, per_device_train_batch_size=per_device,
                             learning_rate=5e-4, report_to=[], use_cpu=True, disable_tqdm=True,
                             seed=0, data_seed=0, save_strategy="no", logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=RMTDataCollator.for_model(model))
    trainer.train()
    if trainer.is_world_process_zero():
        weights = {k: v for k, v in model.state_dict().items() if k != "_extra_state"}
        torch.save(weights, os.path.join(out, "final.pt"))
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"world_size": trainer.args.world_size, "losses": losses}, f)
    # the Trainer holds the DistributedDataParallel wrapper: it must go while the process group
    # exists (freed after destroy_process_group, it hung a rank at exit in 3 of 12 runs); then
    # leave together (a rank whose peer has already exited can abort in gloo's teardown)
    del trainer
    destroy()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1")
