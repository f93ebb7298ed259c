"""LoRA-Drop's training metric (KL to the model, top-1 = agreement with the model's argmax, teacher-forced on
self-distilled ShareGPT answers, the held-out split of ``hf-accel train lora_drop``) for a droppable set with: the
committed adapter's LoRAs of those layers (a ``--init`` warm start's own weights), a trained artifact, and no
correction. CPU, fp32; the figures of the fourteenth H200 run's note (benchmarks/README.md) came from

    OMP_NUM_THREADS=2 PYTHONPATH=. python scripts/lora_drop_train_metric.py \\
        --artifact benchmarks/results/h200-bf16-train14-b1-2026-12-03-r14/ld8
"""

from __future__ import annotations

import argparse
import json

import torch

from hf_accel import loading
from hf_accel.adapters.lora_drop import DropLoRAs
from hf_accel.integrations import artifacts
from hf_accel.train import lora_drop as ldt
from hf_accel.train.data import collate, self_distilled

COMMITTED = "artifacts/smollm2-135m/lora_drop"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", required=True, help="a trained LoRA-Drop artifact (its droppable set is used)")
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    a = ap.parse_args()
    torch.manual_seed(0)
    model, tok = loading.load_model("default", "fp32", "cpu")
    model.requires_grad_(False)
    seqs = self_distilled(model, tok, samples=a.samples, max_new_tokens=a.max_new_tokens, prompt_max=128, batch=8,
                          progress=False)
    settings = json.load(open(f"{a.artifact}/config.json"))["settings"]
    kw = dict(droppable=settings["droppable"], period=settings["period"], rank=settings["rank"])
    init = DropLoRAs(model, **kw)
    init.init_from(artifacts.load(COMMITTED, "lora_drop", model)[0])
    trained = DropLoRAs(model, **kw)
    trained.init_from(artifacts.load(a.artifact, "lora_drop", model)[0])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    for name, part in (("committed LoRAs of the set (the warm start)", init), (a.artifact, trained),
                       ("no correction", DropLoRAs(model, **kw))):
        part.eval()
        fn, tot, n = ldt.make_loss(part, model), {}, 0
        with torch.no_grad():
            for i in range(0, len(seqs), 4):
                ids, mask = collate(seqs[i : i + 4], 384, pad, "cpu")
                for k, v in fn(ids, mask)[1].items():
                    tot[k] = tot.get(k, 0.0) + float(v)
                n += 1
        print(json.dumps({"adapter": name, **{k: round(v / n, 4) for k, v in tot.items()}}), flush=True)


if __name__ == "__main__":
    main()
