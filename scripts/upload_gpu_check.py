"""CUDA check of the step programs' asynchronous uploads (engine/capture.py ``upload``): hidden transfer and LUD on
the static engine with CUDA graphs (eager steps captured, no torch.compile) give vanilla greedy's tokens on a tiny
llama in float32, batch 1 and batch 3 left-padded, over several requests (the pinned mirrors are reused); and hidden
transfer's sampling with the device sampler drawing only the real nodes gives, for one seed, the tokens of drawing at
every position.

    python scripts/upload_gpu_check.py          # on a CUDA machine, from the repository root
"""
import sys

import torch

sys.path.insert(0, "tests")
from conftest import prompts, tiny_model  # noqa: E402
from test_lud import _lora  # noqa: E402
from test_trained import _parts  # noqa: E402

import hf_accel  # noqa: E402, F401


def main():
    assert torch.cuda.is_available()
    # CUDA graphs without torch.compile: the engine's verify step captured eagerly (disable_compile=True would turn
    # the graphs off too, and then this checks nothing of the uploads: the sixth run's log says graphs=False)
    from hf_accel.engine import backends

    backends._compiled_verify = lambda *a, **k: None
    model = tiny_model("llama", seed=3).cuda()
    _, maps = _parts(model)
    lora = _lora(model)
    bad = 0
    for lengths in ((9,), (12, 5, 8)):
        ids, attn = prompts(list(lengths), seed=5)
        ids, attn = ids.cuda(), attn.cuda()
        ref = model.generate(ids, attention_mask=attn, max_new_tokens=24, do_sample=False)
        for method, kw in (("hidden_transfer", {"heads": maps.cuda()}), ("lud", {"adapter": lora.cuda(), "lossless": True,
                                                                                "beta": 0.0})):
            for rep in range(3):
                out = model.generate(ids, attention_mask=attn, max_new_tokens=24, do_sample=False, accel=method,
                                     accel_kwargs=kw, cache_implementation="static")
                st = hf_accel.stats(out)
                ok = torch.equal(out, ref)
                ok = ok and st.extra.get("graphs") is True
                bad += not ok
                print(f"{'PASS' if ok else 'FAIL'} {method} batch {len(lengths)} request {rep}: identical to greedy  "
                      f"graphs={st.extra.get('graphs')} steps={st.steps} new={st.new_tokens}", flush=True)
    # the device sampler draws only the real nodes (adapter.max_real_nodes): with a seed, the same tokens as drawing
    # at every position, on captured steps
    from hf_accel.adapters.hidden_transfer import HiddenTransfer

    ids, attn = prompts([12, 5, 8], seed=5)
    ids, attn = ids.cuda(), attn.cuda()
    kw = dict(attention_mask=attn, max_new_tokens=24, do_sample=True, temperature=0.8, top_p=0.9,
              repetition_penalty=1.2, accel="hidden_transfer", accel_kwargs={"heads": maps},
              cache_implementation="static")
    outs = []
    for every in (False, True):
        if every:
            HiddenTransfer.max_real_nodes = HiddenTransfer.max_tree_nodes
        torch.manual_seed(11)
        out = model.generate(ids, **kw)
        outs.append((out, hf_accel.stats(out)))
    ok = torch.equal(outs[0][0], outs[1][0])
    bad += not ok
    print(f"{'PASS' if ok else 'FAIL'} hidden_transfer sampling batch 3: real nodes only = every position  "
          f"graphs={outs[0][1].extra.get('graphs')} sampling_graph={outs[0][1].extra.get('sampling_graph')}",
          flush=True)
    print("all passed" if not bad else f"{bad} failed")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
