"""Diagnostics behind docs/expert-ablation.md (no tuning; val split only, test never read).

    .venv/bin/python bench/expert_probes.py            # LM-head row norms + mean-pooled linear probes (seconds)
    .venv/bin/python bench/expert_probes.py --concat   # + probes on all 16 patch features (minutes on 2 cores)

1. LM-head row norms of the answer tokens: rows of tokens the base never emitted (numerals,
   ``above``/``below``) versus tokens it answers with (colours, places, number words).
2. Linear probes (logistic regression, train → val) for the digit label on the frozen base's
   features: raw pixels, vision-tower hidden states (mean over patches, or all patches), projector output.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concat", action="store_true", help="also probe the concatenated patch features (slow)")
    args = p.parse_args()
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from deltaserve.tuning import batching, data
    from deltaserve.tuning.pretrain import PretrainConfig, pretrain
    from deltaserve.tuning.tune import world_task_dir

    base = str(pretrain(PretrainConfig(), progress=False).path)
    model = LlavaForConditionalGeneration.from_pretrained(base, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(base)
    tok = proc.tokenizer
    head = model.lm_head.weight.detach()
    groups = {
        "numerals (digits answers; never emitted)": [str(i) for i in range(10)],
        "above/below (relations; never emitted)": ["above", "below"],
        "left/right/top/bottom (emitted by position)": ["left", "right", "top", "bottom"],
        "colours (emitted)": ["red", "blue", "green"],
        "number words (emitted)": ["one", "seven", "twelve"],
    }
    print(f"LM-head row norm, mean over the vocabulary: {head.norm(dim=1).mean():.3f}")
    for name, words in groups.items():
        ids = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in words]
        print(f"  {name}: {head[ids].norm(dim=1).mean():.3f}")

    task = data.load_task(world_task_dir("digits"), splits=("train", "val"))

    def feats(samples):
        enc = batching.encode(proc, samples)
        px = torch.stack([e.pixel_values for e in enc])
        with torch.no_grad():
            hs = model.model.vision_tower(px, output_hidden_states=True).hidden_states
            proj = model.model.get_image_features(pixel_values=px)
            proj = getattr(proj, "pooler_output", proj)
            proj = torch.stack(list(proj)) if isinstance(proj, (list, tuple)) else proj
        out = {f"vision layer {i} (mean over patches)": h[:, 1:].mean(1).numpy() for i, h in enumerate(hs)}
        if args.concat:
            out["pixels"] = px.flatten(1).numpy()
            out.update({f"vision layer {i} (all patches)": h[:, 1:].flatten(1).numpy() for i, h in enumerate(hs)})
            out["projector output (all patches)"] = proj.reshape(len(samples), -1).numpy()
        return out, np.array([int(s.target) for s in samples])

    (ftr, ytr), (fva, yva) = feats(task["train"]), feats(task["val"])
    print("digits linear probes (train → val):")
    for name in ftr:
        clf = LogisticRegression(max_iter=3000).fit(ftr[name], ytr)
        print(
            f"  {name} [{ftr[name].shape[1]} dims]: train {clf.score(ftr[name], ytr):.3f}, val {clf.score(fva[name], yva):.3f}"
        )


if __name__ == "__main__":
    main()
