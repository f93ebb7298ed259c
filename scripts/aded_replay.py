"""Replay greedy outputs through the ADED drafter: exact tokens-per-forward for greedy, no verify forwards.

Usage: python scripts/aded_replay.py START N '{"name": {accel_kwargs...}}'
(e.g. 0 10 '{"best_first": {}, "mcts": {"search": "mcts"}, "n16": {"max_nodes": 16}}').
Greedy acceptance depends only on the drafted tree and the greedy continuation, so this equals the engine's figure.
"""
import torch, hf_accel, time, sys, json, pickle, os
from hf_accel.data import mtbench
from hf_accel.loading import default_datastore_path
from hf_accel.adapters.aded import ADED, ADEDConfig
from hf_accel.engine.adapter import Row
from hf_accel.engine.verify import greedy_walk
m, tok = hf_accel.load_default()
store = str(default_datastore_path(m, tok))
start, n = int(sys.argv[1]), int(sys.argv[2])
import tempfile
cache = os.path.join(tempfile.gettempdir(), f"hf_accel_ref_{start}_{n}.pkl")
if os.path.exists(cache): refs = pickle.load(open(cache,"rb"))
else:
    refs = []
    for ids in mtbench.prompts(tok, start=start, limit=n):
        out = m.generate(torch.tensor([ids]), max_new_tokens=128, do_sample=False)
        refs.append((ids, out[0, len(ids):].tolist()))
    pickle.dump(refs, open(cache,"wb"))
for name, kw in json.loads(sys.argv[3]).items():
    kw = dict(kw); kw.setdefault("datastore", store)
    ad = ADED(m, ADEDConfig(**kw))
    tpfs = []; t0=time.time()
    for ids, gen in refs:
        row = Row(0, list(ids) + [gen[0]], len(ids))
        st = ad.prepare(m, [row], None)
        pos = 1; fwd = 1
        while pos < len(gen):
            tree = ad.draft(st, [row])[0]
            # argmax oracle from reference
            path, node = [0], 0
            ch = tree.children(); k = pos
            while k < len(gen) and gen[k] in ch[node]:
                node = ch[node][gen[k]]; path.append(node); k += 1
            new = gen[pos:min(k+1, len(gen))]
            row.tokens.extend(new); ad.verified(st, row, tree, path, new, None, 0); pos += len(new); fwd += 1
        tpfs.append(len(gen)/fwd)
    print(name, round(sum(tpfs)/len(tpfs),3), [round(x,2) for x in tpfs], round(time.time()-t0,1), flush=True)
