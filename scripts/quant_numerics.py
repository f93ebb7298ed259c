"""Why a bitsandbytes 4-bit target's verify forward can differ from its own one-token decode steps (CPU here).

Runs the default model (fp32, and NF4 with fp32 compute) over one prompt twice: one forward over all tokens, and one
token at a time with a cache; prints the largest hidden-state difference per layer. Unquantized, the two differ by
float32 rounding (~1e-5); NF4 by up to tenths: bnb's 4-bit matmul rounds its outputs to 16 bits, which turns the
float32-level differences of attention over different shapes into steps of 2^-6..2^-5 that grow through the layers.
Usage: python scripts/quant_numerics.py
"""

import torch
from transformers import BitsAndBytesConfig, DynamicCache

from hf_accel.loading import load_default


def gap(model, ids):
    with torch.no_grad():
        full = model(ids, output_hidden_states=True).hidden_states
        cache = DynamicCache()
        steps = [model(ids[:, i : i + 1], past_key_values=cache, use_cache=True, output_hidden_states=True).hidden_states
                 for i in range(ids.shape[1])]
    return [float((full[l][0] - torch.cat([s[l][0] for s in steps])).abs().max()) for l in range(len(full))]


if __name__ == "__main__":
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model, tok = load_default()
    ids = tok("The capital of France is a city that", return_tensors="pt").input_ids
    fp32 = gap(model, ids)
    nf4 = gap(load_default(quantization_config=q)[0], ids)
    print("layer | fp32 max |full - stepwise| | NF4 max |full - stepwise|")
    for layer in (1, 3, 5, 10, 20, len(fp32) - 1):
        print(f"{layer:5d} | {fp32[layer]:.2e} | {nf4[layer]:.2e}")
