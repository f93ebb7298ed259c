"""One-off check (not in CI): quant_spec on a GPTQ 4-bit target quantized here with gptqmodel + optimum, on CPU.

gptqmodel 7.7.0 is an sdist that requires torch>=2.14.1 and transformers>=5.20.2 (pip replaces torch with a CUDA 13
build and pulls the CUDA toolkit wheels), so it can't run on the GPU image (torch 2.11, transformers 5.17, no package
index) nor in CI (CPU torch 2.13). Run it in a throwaway environment:
    pip install gptqmodel optimum && python scripts/gptq_check.py
Prints whether quant_spec's output is token-identical to the GPTQ target's own greedy output.
"""
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, AutoModelForCausalLM, GPTQConfig
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
m = LlamaForCausalLM(cfg); d = tempfile.mkdtemp(); m.save_pretrained(d)
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
tk = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(256)}, unk_token="w0"))
from tokenizers import pre_tokenizers; tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="w0"); tok.save_pretrained(d)
t=time.time()
q = GPTQConfig(bits=4, dataset=[" ".join(f"w{(i*7+j)%256}" for j in range(64)) for i in range(16)], tokenizer=tok, group_size=32)
qm = AutoModelForCausalLM.from_pretrained(d, quantization_config=q, device_map="cpu")
print(type(qm.model.layers[0].self_attn.q_proj), time.time()-t)
print(qm.generate(torch.tensor([[1,2,3]]), max_new_tokens=5, do_sample=False))
import hf_accel, sys
ids = torch.tensor([[5, 9, 12, 5, 9, 12, 5, 9, 12, 40, 41]])
ref = qm.generate(ids, max_new_tokens=40, do_sample=False)
m = m.eval()
for kw in [dict(drafter="aded", aded={"datastore": None}, intermediate="full_precision", full_model=m),
           dict(drafter="model", draft_model=m, intermediate="none")]:
    out = qm.generate(ids, max_new_tokens=40, do_sample=False, accel="quant_spec", accel_kwargs=kw)
    st = hf_accel.stats(out)
    print("GPTQ target", kw["drafter"], kw["intermediate"], "identical:", torch.equal(out, ref), "tok/fwd", round(st.tokens_per_forward, 2))
print(torch.__version__, __import__("transformers").__version__, __import__("gptqmodel").__version__)
