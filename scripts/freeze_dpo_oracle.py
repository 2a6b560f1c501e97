"""Freeze trl's numbers for lab 09's hidden suite (autograder/09_alignment/trl_oracle.json).

trl is the oracle of several of lab 09's checks but is not a grading dependency: the grader reads the
numbers this script writes. Rerun it (and commit the JSON) only to re-derive them, in an environment
with the `oracles` extra, which pins the trl version the numbers come from:

    pip install -e ".[oracles]"          # trl==1.16.0 (plus datasets, pandas, pyarrow)
    python scripts/freeze_dpo_oracle.py

What it freezes (inputs and outputs both, so the suite needs no random generator to agree):
- "logprobs": a seeded tiny GPT-2 (vocab 64, 2 layers, 32 dims) run on a batch from trl's
  `DataCollatorForPreference`; its float32 logits, and per sequence the summed response log-probs by
  trl's `selective_log_softmax` on the shifted logits and by trl's fused LM head
  (`add_fused_lm_head`, the path `DPOTrainer._compute_loss` takes), plus their per-token average
  (count clamped at 1, as trl does).
- "collate": `DataCollatorForPreference` outputs, exactly, with the EOS appended the way
  `DPOTrainer`'s dataset step appends it (unless the response already ends with it).
- "dpo": `DPOTrainer._compute_loss` on plain float32 log-probs through a stand-in trainer and model,
  with `precompute_ref_logps=True`, one pair at a time: `loss_type="sigmoid"` without label smoothing
  (1.16 ignores label_smoothing there) and `loss_type="aot"` with it (cDPO at batch size 1): loss,
  chosen/rejected rewards (trl's metrics), and the gradients of the loss with respect to the policy's
  chosen and rejected log-probs.
- "gkd": `T**2 * GKDTrainer.generalized_jsd_loss(s, t, labels, beta=0, temperature=T)` (forward KL,
  per kept token), on float64 copies of float32 logits.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch

OUT = Path(__file__).resolve().parents[1] / "autograder" / "09_alignment" / "trl_oracle.json"
TRL_VERSION = "1.16.0"


def floats(t: torch.Tensor):
    return t.detach().cpu().to(torch.float64).tolist()


def tiny_gpt2(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3,
                        bos_token_id=63, eos_token_id=63, pad_token_id=63,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


def freeze_logprobs():
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    from trl.trainer.utils import add_fused_lm_head, selective_log_softmax

    g = torch.Generator().manual_seed(9)
    lengths = [(4, 5, 3), (2, 7, 1), (6, 2, 0), (3, 4, 6)]  # (prompt, chosen, rejected); one empty response
    examples = [{"prompt_ids": torch.randint(0, 63, (p,), generator=g).tolist(),
                 "chosen_ids": torch.randint(0, 64, (c,), generator=g).tolist(),
                 "rejected_ids": torch.randint(0, 64, (r,), generator=g).tolist()} for p, c, r in lengths]
    batch = DataCollatorForPreference(pad_token_id=63)(examples)
    model = tiny_gpt2(seed=3)
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    with torch.no_grad():
        logits = model(ids, attention_mask=attn).logits
    token = selective_log_softmax(logits[:, :-1], ids[:, 1:]) * mask[:, 1:]
    selective = token.sum(1)
    count = mask[:, 1:].sum(1).clamp(min=1)
    add_fused_lm_head(model)
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        fused = model(input_ids=ids, attention_mask=attn, labels=labels, fused_lm_head=True, use_cache=False).log_probs.sum(1)
    return {"input_ids": ids.tolist(), "attention_mask": attn.tolist(), "completion_mask": mask.tolist(),
            "logits": floats(logits), "selective_sum": floats(selective), "selective_mean": floats(selective / count),
            "fused_sum": floats(fused)}


def freeze_collate():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    g = torch.Generator().manual_seed(11)

    def rand(n, high=50):
        return torch.randint(1, high, (n,), generator=g).tolist()

    cases = []
    docs = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
            {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]}]
    cases.append({"examples": docs, "pad_token_id": 0, "eos_token_id": None})
    cases.append({"examples": [{"prompt_ids": rand(p), "chosen_ids": rand(c), "rejected_ids": rand(r)}
                               for p, c, r in [(5, 3, 6), (1, 8, 2), (3, 1, 1)]],
                  "pad_token_id": 99, "eos_token_id": None})
    # pad == EOS (GPT-2's usual setup); one response already ends with the EOS, one is empty
    cases.append({"examples": [{"prompt_ids": rand(3), "chosen_ids": rand(2) + [50], "rejected_ids": rand(4)},
                               {"prompt_ids": rand(5), "chosen_ids": [], "rejected_ids": rand(1)},
                               {"prompt_ids": rand(1), "chosen_ids": rand(6), "rejected_ids": rand(2) + [50]}],
                  "pad_token_id": 50, "eos_token_id": 50})
    # pad != EOS
    cases.append({"examples": [{"prompt_ids": rand(2), "chosen_ids": rand(3), "rejected_ids": rand(1) + [51]},
                               {"prompt_ids": rand(4), "chosen_ids": rand(1), "rejected_ids": rand(5)}],
                  "pad_token_id": 0, "eos_token_id": 51})
    for case in cases:
        examples = case["examples"]
        eos = case["eos_token_id"]
        if eos is not None:  # DPOTrainer's dataset step: append the EOS unless the response ends with it
            examples = [{"prompt_ids": e["prompt_ids"],
                         **{k: e[k] if e[k][-1:] == [eos] else e[k] + [eos] for k in ("chosen_ids", "rejected_ids")}}
                        for e in examples]
        out = DataCollatorForPreference(pad_token_id=case["pad_token_id"])(examples)
        case["expected"] = {"input_ids": out["input_ids"].tolist(), "attention_mask": out["attention_mask"].tolist(),
                            "loss_mask": out["completion_mask"].tolist()}
    return cases


def trl_dpo_pair(pc, pr, rc, rr, beta, label_smoothing, loss_type):
    from trl.trainer.dpo_trainer import DPOTrainer

    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    stand_in = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=label_smoothing, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace())
    policy = torch.tensor([pc, pr], dtype=torch.float32, requires_grad=True)
    zeros = torch.zeros(2, 1)
    outputs = SimpleNamespace(log_probs=policy[:, None], entropy=zeros, mean_logits=zeros,
                              is_top1=torch.zeros(2, 1, dtype=torch.bool))
    inputs = {"input_ids": torch.zeros(2, 2, dtype=torch.long), "attention_mask": torch.ones(2, 2, dtype=torch.long),
              "completion_mask": torch.tensor([[0, 1], [0, 1]]),
              "ref_chosen_logps": torch.tensor([rc], dtype=torch.float32),
              "ref_rejected_logps": torch.tensor([rr], dtype=torch.float32)}
    loss = DPOTrainer._compute_loss(stand_in, lambda **kwargs: outputs, inputs, return_outputs=False)
    loss.backward()
    metrics = stand_in._metrics["train"]
    return (float(loss.detach()), metrics["rewards/chosen"][-1], metrics["rewards/rejected"][-1],
            float(policy.grad[0]), float(policy.grad[1]))


def freeze_dpo():
    g = torch.Generator().manual_seed(13)
    cases = []
    for beta, ls in [(0.1, 0.0), (0.5, 0.0), (2.0, 0.0), (0.1, 0.1), (0.5, 0.25), (1.0, 0.4)]:
        n = 6
        logps = (-40 * torch.rand(4, n, generator=g) - 2).to(torch.float32)
        logps[2:] = logps[:2] + 3 * torch.randn(2, n, generator=g)   # a reference near the policy
        pc, pr, rc, rr = logps.tolist()
        rows = [trl_dpo_pair(*vals, beta, ls, "sigmoid" if ls == 0 else "aot") for vals in zip(pc, pr, rc, rr)]
        cases.append({"beta": beta, "label_smoothing": ls, "loss_type": "sigmoid" if ls == 0 else "aot",
                      "policy_chosen_logps": pc, "policy_rejected_logps": pr,
                      "ref_chosen_logps": rc, "ref_rejected_logps": rr,
                      "losses": [r[0] for r in rows], "chosen_rewards": [r[1] for r in rows],
                      "rejected_rewards": [r[2] for r in rows],
                      "grad_policy_chosen": [r[3] for r in rows], "grad_policy_rejected": [r[4] for r in rows]})
    return cases


def freeze_gkd():
    from trl.experimental.gkd import GKDTrainer

    g = torch.Generator().manual_seed(17)
    cases = []
    for temperature in [1.0, 2.0, 4.0]:
        s = (2 * torch.randn(2, 7, 11, generator=g)).to(torch.float32)
        t = (2 * torch.randn(2, 7, 11, generator=g)).to(torch.float32)
        labels = torch.randint(0, 11, (2, 7), generator=g)
        labels[0, :3] = -100
        labels[1, 5:] = -100
        value = GKDTrainer.generalized_jsd_loss(s.double(), t.double(), labels, beta=0, temperature=temperature)
        cases.append({"temperature": temperature, "student_logits": floats(s), "teacher_logits": floats(t),
                      "labels": labels.tolist(), "t2_gkd": float(value) * temperature ** 2})
    return cases


def main():
    import trl

    if trl.__version__ != TRL_VERSION:
        raise SystemExit(f"these numbers are frozen from trl {TRL_VERSION}; found trl {trl.__version__}")
    torch.set_num_threads(1)
    data = {"trl_version": trl.__version__, "torch_version": torch.__version__.split("+")[0],
            "logprobs": freeze_logprobs(), "collate": freeze_collate(), "dpo": freeze_dpo(), "gkd": freeze_gkd()}
    OUT.write_text(json.dumps(data) + "\n", encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
