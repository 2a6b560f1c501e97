"""Hidden suite for lab 09: aligning and compressing language models (DPO, knowledge distillation).

Oracles, test by test:
- sequence_logprobs: an explicit float64 gather over `torch.log_softmax` of the shifted logits
  (`_matches_gather`, `_masks`, `_average`), autograd on it (`_gradients`); `transformers`' own loss,
  `-GPT2LMHeadModel(ids, labels=ids.masked_fill(mask == 0, -100)).loss * n_tokens` per row, and
  trl 1.16.0's `selective_log_softmax` and fused LM head (`add_fused_lm_head`, the path
  `DPOTrainer._compute_loss` takes) on a frozen batch of GPT-2 logits (`_gpt2_loss`, `_average`).
- collate_preferences: trl 1.16.0's `DataCollatorForPreference`, exact equality (frozen outputs; the
  EOS appended as `DPOTrainer`'s dataset step appends it).
- dpo_loss: trl 1.16.0's `DPOTrainer._compute_loss` run on plain log-probs through a stand-in trainer
  (`loss_type="sigmoid"`; `"aot"` at batch size 1 for label smoothing, i.e. cDPO): losses, rewards and
  the gradients of the loss, frozen; the float64 formula with `F.logsigmoid` for large margins.
- dpo_step: the contract's step, written here independently (trl's formulas, mean over pairs, SGD),
  on the same tiny GPT-2s (one step of trl 1.16.0's `DPOTrainer` with SGD, a constant LR and
  max_grad_norm=0 was measured to match it to 2.4e-7 when the lab was designed; not re-frozen here).
- distillation_loss: `F.kl_div(F.log_softmax(s / T), F.log_softmax(t / T), log_target=True,
  reduction="batchmean") * T**2` on the kept rows flattened to 2-D plus `F.cross_entropy(...,
  ignore_index=...)`, in float64; `T**2 *` trl 1.16.0's `GKDTrainer.generalized_jsd_loss(s, t,
  labels, beta=0, temperature=T)` (frozen).
- distill_step: the contract's step written here with PyTorch, on the course's char GPT (teacher,
  scripts/train_char_gpt.py + data/char_gpt, rebuilt with dropout 0.1) and a 1-layer char GPT student.

trl is not needed to grade: its numbers live in trl_oracle.json beside this file, written by
scripts/freeze_dpo_oracle.py (the `oracles` extra pins trl). All models are tiny; torch runs on one
thread on both sides (with two threads on a busy 2-core machine each check took ten times longer).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from coursekit.testing import assert_close, assert_equal, gen

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[2]
ORACLE = json.loads(Path(__file__).with_name("trl_oracle.json").read_text(encoding="utf-8"))

F32 = dict(rtol=1e-5, atol=5e-5)        # sequence_logprobs, float32
F64 = dict(rtol=1e-8, atol=1e-9)        # float64
LOSS32 = dict(rtol=1e-5, atol=1e-5)     # dpo_loss and distillation_loss, float32
GRAD32 = dict(rtol=1e-4, atol=1e-7)     # dpo_loss gradients, float32
WEIGHTS = dict(rtol=1e-4, atol=1e-5)    # parameters after optimizer steps
TOL = {torch.float32: F32, torch.float64: F64}


@pytest.fixture(autouse=True)
def one_thread(student):
    """These models are tiny: one thread is fastest, on a shared machine by far."""
    try:
        student.lib("torch.set_num_threads")(1)
    except Exception:  # noqa: BLE001 - a broken kernel fails the test itself, with its own message
        pass


def logits_labels_mask(seed, shape, vocab, dtype, p_mask=0.6):
    g = gen(seed)
    logits = (3 * torch.randn(*shape, vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=g)
    mask = torch.rand(shape, generator=g) < p_mask
    return logits, labels, mask


def oracle_logprobs(logits, labels, mask, average=False):
    """float64: sum over t >= 1 with mask[t] != 0 of log_softmax(logits[t - 1])[labels[t]]."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    flat_logp = logp.reshape(-1, logp.shape[-2], logp.shape[-1])
    flat_labels = labels.reshape(-1, labels.shape[-1])
    flat_mask = mask.reshape(-1, mask.shape[-1])
    out = torch.zeros(flat_labels.shape[0], dtype=torch.float64)
    for r in range(flat_labels.shape[0]):
        n = 0
        for t in range(1, flat_labels.shape[1]):
            if flat_mask[r, t] != 0:
                out[r] = out[r] + flat_logp[r, t - 1, flat_labels[r, t]]
                n += 1
        if average:
            out[r] = out[r] / max(n, 1)
    return out.reshape(labels.shape[:-1])


# -- sequence_logprobs -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 9), (2, 3, 7), (6,)])
def test_sequence_logprobs_matches_gather(student, device, dtype, shape):
    logits, labels, mask = logits_labels_mask(sum(shape) + len(shape), shape, 17, dtype)
    actual = student.sequence_logprobs(logits.to(device), labels.to(device), mask.to(device))
    expected = oracle_logprobs(logits, labels, mask).to(dtype)
    assert_close(actual, expected, **TOL[dtype],
                 what=f"sequence_logprobs on logits {tuple(logits.shape)} ({dtype}), summed over the response")
    # trl 1.16.0's selective_log_softmax on the frozen GPT-2 batch
    frozen = ORACLE["logprobs"]
    ids, cmask = torch.tensor(frozen["input_ids"]), torch.tensor(frozen["completion_mask"])
    actual = student.sequence_logprobs(torch.tensor(frozen["logits"], dtype=torch.float32).to(device), ids.to(device),
                                       cmask.to(device))
    assert_close(actual, torch.tensor(frozen["selective_sum"], dtype=torch.float32), **F32,
                 what="sequence_logprobs on a GPT-2 preference batch (against trl's selective_log_softmax)")


def tiny_gpt2(seed, dropout=0.0, dtype=torch.float32) -> GPT2LMHeadModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(**gpt2_kwargs(dropout)))
    return model.to(dtype).eval()


def gpt2_kwargs(dropout=0.0) -> dict:
    return dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3,
                bos_token_id=63, eos_token_id=63, pad_token_id=63,
                resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)


def right_padded(seed, rows, pad=63, max_prompt=5, max_response=6):
    """A right-padded batch like collate_preferences makes: (input_ids, attention_mask, loss_mask)."""
    g = gen(seed)
    seqs = []
    for _ in range(rows):
        p = int(torch.randint(1, max_prompt + 1, (1,), generator=g))
        r = int(torch.randint(0, max_response + 1, (1,), generator=g))
        seqs.append((torch.randint(0, 64, (p + r,), generator=g).tolist(), p))
    length = max(len(s) for s, _ in seqs)
    ids = torch.full((rows, length), pad, dtype=torch.long)
    attn = torch.zeros(rows, length, dtype=torch.long)
    loss = torch.zeros(rows, length, dtype=torch.long)
    for i, (s, p) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        loss[i, p:len(s)] = 1
    return ids, attn, loss


def test_sequence_logprobs_gpt2_loss(student, device):
    model = tiny_gpt2(seed=5)
    ids, attn, loss_mask = right_padded(21, 6)
    with torch.no_grad():
        logits = model(ids, attention_mask=attn).logits
        expected = torch.zeros(ids.shape[0])
        for r in range(ids.shape[0]):
            n = int(loss_mask[r, 1:].sum())
            if n:
                labels = ids[r:r + 1].masked_fill(loss_mask[r:r + 1] == 0, -100)
                expected[r] = -model(ids[r:r + 1], attention_mask=attn[r:r + 1], labels=labels).loss * n
    actual = student.sequence_logprobs(logits.to(device), ids.to(device), loss_mask.to(device))
    assert_close(actual, expected, **F32,
                 what="sequence_logprobs on a GPT-2's logits (against -loss * number of response tokens, per row)")
    frozen = ORACLE["logprobs"]
    ids, cmask = torch.tensor(frozen["input_ids"]), torch.tensor(frozen["completion_mask"])
    actual = student.sequence_logprobs(torch.tensor(frozen["logits"], dtype=torch.float32).to(device), ids.to(device),
                                       cmask.to(device))
    assert_close(actual, torch.tensor(frozen["fused_sum"], dtype=torch.float32), **F32,
                 what="sequence_logprobs on a GPT-2 preference batch (against the log-probs trl's DPOTrainer sums)")


def test_sequence_logprobs_masks(student, device):
    logits, labels, mask = logits_labels_mask(31, (4, 8), 13, torch.float32)
    mask[:, 0] = False
    expected = oracle_logprobs(logits, labels, mask).float()
    for name, m in [("bool", mask), ("0/1 long", mask.long()), ("0/1 float", mask.float()),
                    ("0/1 int32", mask.int())]:
        actual = student.sequence_logprobs(logits.to(device), labels.to(device), m.to(device))
        assert_close(actual, expected, **F32, what=f"sequence_logprobs with a {name} loss_mask")
    first_on = mask.clone()
    first_on[:, 0] = True
    actual = student.sequence_logprobs(logits.to(device), labels.to(device), first_on.to(device))
    assert_close(actual, expected, **F32,
                 what="sequence_logprobs with loss_mask[..., 0] set (position 0 is never scored: no logit predicts it)")
    ignored = labels.masked_fill(~mask, -100)
    actual = student.sequence_logprobs(logits.to(device), ignored.to(device), mask.to(device))
    assert_close(actual, expected, **F32,
                 what="sequence_logprobs with labels -100 wherever loss_mask is 0 (position 0 included)")


def test_sequence_logprobs_average(student, device):
    logits, labels, mask = logits_labels_mask(41, (5, 9), 11, torch.float64)
    mask[2] = False                     # a row with no scored token
    mask[3] = False
    mask[3, 0] = True                   # ... and one whose only mask bit is at position 0
    for average in (True, False):
        actual = student.sequence_logprobs(logits.to(device), labels.to(device), mask.to(device), average=average)
        expected = oracle_logprobs(logits, labels, mask, average=average)
        assert_close(actual, expected, **F64,
                     what=f"sequence_logprobs(..., average={average}) with rows that score no token (they give 0)")
    frozen = ORACLE["logprobs"]
    ids, cmask = torch.tensor(frozen["input_ids"]), torch.tensor(frozen["completion_mask"])
    actual = student.sequence_logprobs(torch.tensor(frozen["logits"], dtype=torch.float32).to(device),
                                       ids.masked_fill(cmask == 0, -100).to(device), cmask.to(device), average=True)
    assert_close(actual, torch.tensor(frozen["selective_mean"], dtype=torch.float32), **F32,
                 what="sequence_logprobs(..., average=True) on a GPT-2 preference batch (trl's per-token mean)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sequence_logprobs_gradients(student, device, dtype):
    logits, labels, mask = logits_labels_mask(51, (3, 7), 10, dtype)
    g_out = torch.randn(3, generator=gen(52)).to(dtype)
    leaf = logits.clone().to(device).requires_grad_(True)
    result = student.backward(student.sequence_logprobs, leaf, labels.to(device), mask.to(device),
                              grad_outputs=g_out.to(device))
    ref = logits.double().requires_grad_(True)
    (oracle_logprobs(ref, labels, mask) * g_out.double()).sum().backward()
    assert result.grads[0] is not None, "no gradient reached the logits through sequence_logprobs"
    assert_close(result.grads[0], ref.grad.to(dtype), **({torch.float32: dict(rtol=1e-5, atol=1e-6)}.get(dtype, F64)),
                 what=f"the gradient of sequence_logprobs with respect to the logits ({dtype})")


def test_sequence_logprobs_shape_errors(student, device):
    logits, labels, mask = logits_labels_mask(61, (2, 6), 9, torch.float64)
    assert_close(student.sequence_logprobs(logits.to(device), labels.to(device), mask.to(device)),
                 oracle_logprobs(logits, labels, mask), **F64, what="sequence_logprobs")
    with pytest.raises(ValueError):
        student.sequence_logprobs(logits.to(device), labels[:, :-1].to(device), mask[:, :-1].to(device))
    with pytest.raises(ValueError):
        student.sequence_logprobs(logits.to(device), labels.to(device), mask[:, 1:].to(device))
    with pytest.raises(ValueError):
        student.sequence_logprobs(logits.to(device), labels[:1].to(device), mask[:1].to(device))


# -- collate_preferences ---------------------------------------------------------------------------


def check_collated(actual, expected: dict, what: str):
    assert isinstance(actual, dict), f"{what} should return a dict, got {getattr(actual, 'type_name', type(actual).__name__)}"
    for key in ("input_ids", "attention_mask", "loss_mask"):
        assert key in actual, f"{what}: the result has no key {key!r}"
        assert_equal(actual[key].cpu() if isinstance(actual[key], torch.Tensor) else actual[key],
                     torch.tensor(expected[key], dtype=torch.long), what=f"{what}[{key!r}]")


def test_collate_layout(student):
    for i, case in enumerate(c for c in ORACLE["collate"] if c["eos_token_id"] is None):
        actual = student.collate_preferences(case["examples"], case["pad_token_id"])
        check_collated(actual, case["expected"],
                       f"collate_preferences(examples, pad_token_id={case['pad_token_id']}) (case {i})")
        as_tensors = [{k: torch.tensor(v, dtype=torch.long) for k, v in e.items()} for e in case["examples"]]
        actual = student.collate_preferences(as_tensors, case["pad_token_id"])
        check_collated(actual, case["expected"], f"collate_preferences on 1-D tensors (case {i})")


def test_collate_eos_pad_equal(student):
    for case in (c for c in ORACLE["collate"] if c["eos_token_id"] is not None):
        what = (f"collate_preferences(examples, pad_token_id={case['pad_token_id']}, "
                f"eos_token_id={case['eos_token_id']})")
        check_collated(student.collate_preferences(case["examples"], case["pad_token_id"], case["eos_token_id"]),
                       case["expected"], what)


def test_collate_errors(student):
    case = ORACLE["collate"][0]
    check_collated(student.collate_preferences(case["examples"], case["pad_token_id"]), case["expected"],
                   "collate_preferences")
    with pytest.raises(ValueError):
        student.collate_preferences([], 0)
    with pytest.raises(ValueError):
        student.collate_preferences([{"prompt_ids": [], "chosen_ids": [1, 2], "rejected_ids": [3]}], 0)
    with pytest.raises(ValueError):
        student.collate_preferences(case["examples"] + [{"prompt_ids": [], "chosen_ids": [4], "rejected_ids": [5]}],
                                    0, 9)


# -- dpo_loss --------------------------------------------------------------------------------------


def dpo_inputs(case, dtype=torch.float32):
    return [torch.tensor(case[k], dtype=dtype) for k in
            ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")]


def check_dpo_against_trl(student, device, case, what):
    inputs = dpo_inputs(case)
    result = student.dpo_loss(*[t.to(device) for t in inputs], beta=case["beta"], label_smoothing=case["label_smoothing"])
    assert isinstance(result, (tuple, list)) and len(result) == 3, \
        "dpo_loss should return a tuple (losses, chosen_rewards, rejected_rewards)"
    for value, key in zip(result, ("losses", "chosen_rewards", "rejected_rewards")):
        assert_close(value, torch.tensor(case[key], dtype=torch.float32), **LOSS32, what=f"{what}: {key}")


def test_dpo_loss_matches_trl(student, device):
    for case in (c for c in ORACLE["dpo"] if c["label_smoothing"] == 0):
        check_dpo_against_trl(student, device, case, f"dpo_loss(..., beta={case['beta']})")
    # shape (2, 3) and float64, against the float64 formula
    case = ORACLE["dpo"][1]
    pc, pr, rc, rr = [t.double().reshape(2, 3) for t in dpo_inputs(case)]
    h = 0.5 * ((pc - rc) - (pr - rr))
    losses, cr, rj = student.dpo_loss(pc.to(device), pr.to(device), rc.to(device), rr.to(device), beta=0.5)
    assert_close(losses, -F.logsigmoid(h), **F64, what="dpo_loss losses on float64 inputs of shape (2, 3)")
    assert_close(cr, 0.5 * (pc - rc), **F64, what="dpo_loss chosen_rewards on float64 inputs of shape (2, 3)")
    assert_close(rj, 0.5 * (pr - rr), **F64, what="dpo_loss rejected_rewards on float64 inputs of shape (2, 3)")


def test_dpo_loss_label_smoothing(student, device):
    for case in (c for c in ORACLE["dpo"] if c["label_smoothing"] > 0):
        check_dpo_against_trl(student, device, case,
                              f"dpo_loss(..., beta={case['beta']}, label_smoothing={case['label_smoothing']})")


def test_dpo_loss_large_margins(student, device):
    # beta * h from -1e5 to 1e5 (integers below 2**24: every input exact in float32)
    margins = torch.tensor([-1e6, -7500.0, -1000.0, -900.0, -30.0, 0.0, 45.0, 1000.0, 7500.0, 1e6])
    pc = torch.full_like(margins, -3.0)
    rc = torch.full_like(margins, -5.0)
    rr = torch.full_like(margins, -8.0)
    pr = pc - rc + rr - margins            # so that h = (pc - rc) - (pr - rr) = margins
    for dtype in (torch.float32, torch.float64):
        for eps in (0.0, 0.2):
            x = 0.1 * margins.double()
            expected = -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)
            grad_pc = -(1 - eps) * 0.1 * torch.sigmoid(-x) + eps * 0.1 * torch.sigmoid(x)
            leaves = [t.to(dtype).to(device).requires_grad_(True) for t in (pc, pr, rc, rr)]
            result = student.backward(student.dpo_loss, *leaves, beta=0.1, label_smoothing=eps,
                                      grad_outputs=(torch.ones(len(margins), dtype=dtype).to(device), None, None))
            tol = F64 if dtype == torch.float64 else LOSS32
            what = f"dpo_loss with |beta * h| up to 1e5 ({dtype}, label_smoothing={eps})"
            assert_close(result.output[0], expected.to(dtype), **tol, what=f"{what}: losses")
            grads = result.grads[0]
            assert grads is not None, f"{what}: no gradient reached policy_chosen_logps"
            assert bool(torch.isfinite(grads).all()), f"{what}: the gradient is NaN or inf"
            assert_close(grads, grad_pc.to(dtype), **(F64 if dtype == torch.float64 else GRAD32),
                         what=f"{what}: gradient with respect to policy_chosen_logps")


def test_dpo_loss_rewards_detached_gradients(student, device):
    for case in ORACLE["dpo"]:
        leaves = [t.to(device).requires_grad_(True) for t in dpo_inputs(case)]
        what = f"dpo_loss(..., beta={case['beta']}, label_smoothing={case['label_smoothing']})"
        result = student.backward(student.dpo_loss, *leaves, beta=case["beta"], label_smoothing=case["label_smoothing"],
                                  grad_outputs=(torch.ones(len(case["losses"])).to(device), None, None))
        for i, key in [(0, "grad_policy_chosen"), (1, "grad_policy_rejected")]:
            assert result.grads[i] is not None, f"{what}: no gradient reached the policy's log-probs"
            assert_close(result.grads[i], torch.tensor(case[key], dtype=torch.float32), **GRAD32,
                         what=f"{what}: {key.replace('grad_', 'gradient with respect to ')}")
        for i, key in [(2, "grad_policy_chosen"), (3, "grad_policy_rejected")]:  # d/d ref = -d/d policy
            assert result.grads[i] is not None, f"{what}: no gradient reached the reference log-probs"
            assert_close(result.grads[i], -torch.tensor(case[key], dtype=torch.float32), **GRAD32,
                         what=f"{what}: gradient with respect to the reference log-probs")
        ones = torch.ones(len(case["losses"])).to(device)
        result = student.backward(student.dpo_loss, *leaves, beta=case["beta"], label_smoothing=case["label_smoothing"],
                                  grad_outputs=(None, ones, ones))
        for g in result.grads:
            assert g is None or not bool(g.any()), (
                f"{what}: gradients flow through the rewards; chosen_rewards and rejected_rewards must be detached")


def test_dpo_loss_errors(student, device):
    case = ORACLE["dpo"][0]
    check_dpo_against_trl(student, device, case, "dpo_loss")
    inputs = [t.to(device) for t in dpo_inputs(case)]
    for kwargs in [dict(beta=0.0), dict(beta=-0.1), dict(label_smoothing=0.5), dict(label_smoothing=-0.1),
                   dict(label_smoothing=0.7)]:
        with pytest.raises(ValueError):
            student.dpo_loss(*inputs, **kwargs)


# -- dpo_step --------------------------------------------------------------------------------------


def student_gpt2(student, state: dict, dropout: float, train: bool, device):
    config = student.lib("transformers.GPT2Config")(**gpt2_kwargs(dropout))
    model = student.lib("transformers.GPT2LMHeadModel")(config)
    model.load_state_dict(state)
    model.to(device)
    model.train(train)
    return model


def reference_dpo(state, batch, device, steps, beta, label_smoothing, optimizer="sgd", lr=1.0):
    """The contract's dpo_step, `steps` times on the same batch: (CPU state dict, per-step metrics)."""
    policy = tiny_gpt2(0).to(device)
    policy.load_state_dict(state)
    reference = tiny_gpt2(0).to(device)
    reference.load_state_dict(state)
    opt = (torch.optim.SGD(policy.parameters(), lr=lr) if optimizer == "sgd"
           else torch.optim.Adam(policy.parameters(), lr=lr))
    ids, attn, mask = (batch[k].to(device) for k in ("input_ids", "attention_mask", "loss_mask"))
    b = ids.shape[0] // 2
    metrics = []
    policy.train()
    for _ in range(steps):
        with torch.no_grad():
            ref = oracle_logps_torch(reference(ids, attention_mask=attn).logits, ids, mask)
        logps = oracle_logps_torch(policy(ids, attention_mask=attn).logits, ids, mask)
        chosen, rejected = beta * (logps[:b] - ref[:b]), beta * (logps[b:] - ref[b:])
        h = chosen - rejected
        losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
        loss = losses.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        margin = (chosen - rejected).detach()
        metrics.append({"loss": loss.item(), "reward_margin": margin.mean().item(),
                        "reward_accuracy": (margin > 0).float().mean().item()})
    return {k: v.detach().cpu() for k, v in policy.state_dict().items()}, metrics


def oracle_logps_torch(logits, ids, mask):
    token = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token * mask[:, 1:]).sum(-1)


def preference_batch(seed, pairs):
    ids, attn, mask = right_padded(seed, 2 * pairs, max_prompt=4, max_response=5)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": mask}


def as_float(value, what):
    assert isinstance(value, (int, float)) and not isinstance(value, bool), (
        f"{what} should be a Python float (use .item()), got {getattr(value, 'type_name', type(value).__name__)}")
    return float(value)


def run_student_dpo(student, device, state, batch, steps, beta, label_smoothing, optimizer="sgd", lr=1.0):
    policy = student_gpt2(student, state, 0.0, False, device)            # no dropout, arrives in eval mode
    reference = student_gpt2(student, state, 0.1, True, device)          # dropout 0.1, arrives in TRAIN mode
    opt_cls = "torch.optim.SGD" if optimizer == "sgd" else "torch.optim.Adam"
    opt = student.lib(opt_cls).keep(policy.parameters.keep(), lr=lr)
    metrics = []
    for _ in range(steps):
        out = student.dpo_step(policy, reference, batch, opt, beta=beta, label_smoothing=label_smoothing)
        assert isinstance(out, dict), "dpo_step should return a dict"
        for key in ("loss", "reward_margin", "reward_accuracy"):
            assert key in out, f"dpo_step's result has no key {key!r}"
        metrics.append({k: as_float(out[k], f"dpo_step(...)[{k!r}]") for k in ("loss", "reward_margin", "reward_accuracy")})
    return policy, reference, metrics


@pytest.mark.parametrize("beta, label_smoothing", [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_step_matches_reference(student, device, beta, label_smoothing):
    state = tiny_gpt2(seed=71).state_dict()
    batch = preference_batch(72, pairs=3)
    expected_state, expected = reference_dpo(state, batch, device, 2, beta, label_smoothing)
    policy, _, metrics = run_student_dpo(student, device, state, {k: v.to(device) for k, v in batch.items()},
                                         2, beta, label_smoothing)
    what = f"dpo_step(beta={beta}, label_smoothing={label_smoothing})"
    for step, (got, want) in enumerate(zip(metrics, expected), start=1):
        for key in ("loss", "reward_margin"):
            assert math.isclose(got[key], want[key], rel_tol=1e-4, abs_tol=1e-5), (
                f"{what}, step {step}: {key} is {got[key]:.6g}, the reference's differs")
        assert got["reward_accuracy"] == pytest.approx(want["reward_accuracy"], abs=1e-6), (
            f"{what}, step {step}: reward_accuracy is {got['reward_accuracy']:.4g}, the reference's differs "
            "(a pair counts when its chosen reward is strictly above its rejected reward)")
    got_state = policy.state_dict()
    for name, value in expected_state.items():
        assert name in got_state, f"{what}: the policy has no parameter {name!r} after the steps"
        assert_close(got_state[name].cpu(), value, **WEIGHTS,
                     what=f"{what}: policy parameter {name!r} after two SGD steps (lr 1.0)")


def test_dpo_step_frozen_reference(student, device):
    state = tiny_gpt2(seed=81).state_dict()
    batch = {k: v.to(device) for k, v in preference_batch(82, pairs=2).items()}
    policy, reference, metrics = run_student_dpo(student, device, state, batch, 2, 0.1, 0.0)
    assert policy.training is True, "dpo_step should leave the policy in train mode (policy.train())"
    assert reference.training is False, "dpo_step should put the reference in eval mode (reference.eval())"
    getter = student.lib("operator.attrgetter").keep("grad")
    grads = student.lib("builtins.list")(student.lib("builtins.map").keep(getter, reference.parameters.keep()))
    assert all(g is None for g in grads), (
        "the reference model received gradients: compute its log-probs under torch.no_grad()")
    ref_state = reference.state_dict()
    for name, value in state.items():
        assert_equal(ref_state[name].cpu(), value, what=f"the reference's parameter {name!r} after dpo_step")
    first = metrics[0]
    assert math.isclose(first["loss"], math.log(2), abs_tol=1e-5) and abs(first["reward_margin"]) < 1e-5, (
        "at the first step the policy equals the reference: the rewards should be exactly 0 and the loss log 2 "
        "(is the reference in eval mode, without dropout?)")


def test_dpo_run_raises_margin(student, device):
    state = tiny_gpt2(seed=91).state_dict()
    batch = preference_batch(92, pairs=4)
    policy, _, metrics = run_student_dpo(student, device, state, {k: v.to(device) for k, v in batch.items()},
                                         12, 0.1, 0.0, optimizer="adam", lr=1e-2)
    assert metrics[-1]["reward_margin"] > 0.5 and metrics[-1]["loss"] < 0.5, (
        f"after 12 DPO steps (Adam, lr 1e-2) on one batch the reward margin is {metrics[-1]['reward_margin']:.3g} "
        f"and the loss {metrics[-1]['loss']:.3g}: DPO should raise the margin well above 0")
    # the margin of the trained policy, measured here
    trained = tiny_gpt2(0)
    trained.load_state_dict({k: v.cpu() for k, v in policy.state_dict().items()})
    reference = tiny_gpt2(0)
    reference.load_state_dict(state)
    with torch.no_grad():
        ids, mask = batch["input_ids"], batch["loss_mask"]
        diff = oracle_logps_torch(trained(ids).logits, ids, mask) - oracle_logps_torch(reference(ids).logits, ids, mask)
    margin = 0.1 * (diff[:4] - diff[4:])
    assert bool((margin > 0).all()), "after 12 DPO steps the policy does not prefer every chosen response"


# -- distillation_loss -----------------------------------------------------------------------------


def oracle_distillation(s, t, labels, temperature, alpha, ignore_index=-100):
    keep = labels != ignore_index
    s2, t2 = s.double()[keep], t.double()[keep]
    kl = F.kl_div(F.log_softmax(s2 / temperature, dim=-1), F.log_softmax(t2 / temperature, dim=-1),
                  log_target=True, reduction="batchmean") * temperature ** 2
    ce = F.cross_entropy(s.double().reshape(-1, s.shape[-1]), labels.reshape(-1), ignore_index=ignore_index)
    return alpha * kl + (1 - alpha) * ce


def distill_inputs(seed, shape, classes, dtype, ignore_index=-100, p_ignore=0.3):
    g = gen(seed)
    s = (2 * torch.randn(*shape, classes, generator=g)).to(dtype)
    t = (2 * torch.randn(*shape, classes, generator=g)).to(dtype)
    labels = torch.randint(0, classes, shape, generator=g)
    labels = labels.masked_fill(torch.rand(shape, generator=g) < p_ignore, ignore_index)
    labels.view(-1)[0] = 1                   # at least one kept row
    return s, t, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, temperature, alpha", [((12,), 1.0, 0.5), ((12,), 4.0, 1.0), ((3, 5), 2.0, 0.9),
                                                       ((2, 6), 2.0, 0.0), ((2, 2, 4), 3.0, 0.3)])
def test_distillation_loss_matches_torch(student, device, dtype, shape, temperature, alpha):
    s, t, labels = distill_inputs(len(shape) * 10 + int(temperature) + int(10 * alpha), shape, 9, dtype)
    actual = student.distillation_loss(s.to(device), t.to(device), labels.to(device), temperature, alpha)
    assert_close(actual, oracle_distillation(s, t, labels, temperature, alpha).to(dtype),
                 **(LOSS32 if dtype == torch.float32 else F64),
                 what=f"distillation_loss on logits {tuple(s.shape)} ({dtype}), T={temperature}, alpha={alpha}")
    if dtype == torch.float32 and shape == (12,):
        for case in ORACLE["gkd"]:
            s, t = (torch.tensor(case[k], dtype=torch.float32) for k in ("student_logits", "teacher_logits"))
            actual = student.distillation_loss(s.to(device), t.to(device), torch.tensor(case["labels"]).to(device),
                                               case["temperature"], 1.0)
            assert_close(actual, torch.tensor(case["t2_gkd"], dtype=torch.float32), **LOSS32,
                         what=f"distillation_loss(alpha=1.0, T={case['temperature']}) on a language model's logits "
                              "(against T^2 times trl's GKD loss with beta=0)")


def test_distillation_loss_per_token(student, device):
    # (B, L, V) with many ignored tokens: the loss is per kept token, not per sequence
    s, t, labels = distill_inputs(101, (3, 10), 7, torch.float32, p_ignore=0.6)
    for alpha in (1.0, 0.5):
        actual = student.distillation_loss(s.to(device), t.to(device), labels.to(device), 2.0, alpha)
        assert_close(actual, oracle_distillation(s, t, labels, 2.0, alpha).float(), **LOSS32,
                     what=f"distillation_loss on (B, L, V) logits with ignored tokens (alpha={alpha}): "
                          "average over the kept tokens")
    s, t, labels = distill_inputs(102, (2, 8), 7, torch.float32, ignore_index=0, p_ignore=0.5)
    actual = student.distillation_loss(s.to(device), t.to(device), labels.to(device), 2.0, 0.7, ignore_index=0)
    assert_close(actual, oracle_distillation(s, t, labels, 2.0, 0.7, ignore_index=0).float(), **LOSS32,
                 what="distillation_loss with ignore_index=0")


def test_distillation_loss_gradients_teacher_constant(student, device):
    s, t, labels = distill_inputs(111, (2, 5), 8, torch.float64)
    s_leaf = s.clone().to(device).requires_grad_(True)
    t_leaf = t.clone().to(device).requires_grad_(True)
    result = student.backward(student.distillation_loss, s_leaf, t_leaf, labels.to(device), 2.0, 0.6)
    ref = s.clone().requires_grad_(True)
    oracle_distillation(ref, t, labels, 2.0, 0.6).backward()
    assert result.grads[0] is not None, "no gradient reached the student's logits"
    assert_close(result.grads[0], ref.grad, **F64, what="the gradient of distillation_loss with respect to the student logits")
    g = result.grads[1]
    assert g is None or not bool(g.any()), (
        "a gradient reached the teacher's logits: the teacher is a constant target (detach it)")


def test_distillation_loss_errors(student, device):
    s, t, labels = distill_inputs(121, (2, 4), 6, torch.float64)
    assert_close(student.distillation_loss(s.to(device), t.to(device), labels.to(device), 2.0, 0.5),
                 oracle_distillation(s, t, labels, 2.0, 0.5), **F64, what="distillation_loss")
    d = lambda x: x.to(device)  # noqa: E731
    bad = [((d(s), d(t), d(labels), 0.0, 0.5), {}), ((d(s), d(t), d(labels), -1.0, 0.5), {}),
           ((d(s), d(t), d(labels), 2.0, 1.5), {}), ((d(s), d(t), d(labels), 2.0, -0.1), {}),
           ((d(s), d(t[..., :-1]), d(labels), 2.0, 0.5), {}), ((d(s), d(t), d(labels[:, :-1]), 2.0, 0.5), {}),
           ((d(s), d(t), d(torch.full_like(labels, -100)), 2.0, 0.5), {})]
    for args, kwargs in bad:
        with pytest.raises(ValueError):
            student.distillation_loss(*args, **kwargs)


# -- distill_step ----------------------------------------------------------------------------------


def char_gpt_module():
    path = ROOT / "scripts" / "train_char_gpt.py"
    if "lab09_train_char_gpt" not in sys.modules:
        spec = importlib.util.spec_from_file_location("lab09_train_char_gpt", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["lab09_train_char_gpt"]


_CACHE: dict = {}


def char_setup(data_dir):
    """The course's char GPT (as its loader builds it), its config with dropout 0.1, a seeded 1-layer
    48-dim student's config and state, and the encoded Tiny Shakespeare."""
    if not _CACHE:
        m = char_gpt_module()
        teacher, tok = m.load_char_gpt(data_dir / "char_gpt")
        teacher_cfg = dataclasses.replace(teacher.cfg, dropout=0.1)
        student_cfg = dataclasses.replace(teacher.cfg, n_layer=1, n_head=4, n_embd=48, dropout=0.0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)
            student_model = m.CharGPT(student_cfg)
        text = (data_dir / "tinyshakespeare.txt").read_text(encoding="utf-8")
        data = torch.tensor(tok.encode(text), dtype=torch.long)
        _CACHE.update(module=m, teacher_state=teacher.state_dict(), teacher_cfg=teacher_cfg,
                      student_cfg=student_cfg, student_state=student_model.state_dict(), data=data)
    return _CACHE


def char_batches(data, seed, n, batch=8, length=33, held_out=False):
    split = int(0.9 * len(data))
    part = data[split:] if held_out else data[:split]
    g = gen(seed)
    out = []
    for _ in range(n):
        starts = torch.randint(0, len(part) - length, (batch,), generator=g)
        out.append(torch.stack([part[i:i + length] for i in starts.tolist()]))
    return out


def student_char_gpt(student, cfg, state, train, device):
    config = student.CharGPTConfig(**dataclasses.asdict(cfg))
    model = student.CharGPT(config)
    model.load_state_dict(state)
    model.to(device)
    model.train(train)
    return model


def reference_distill(setup, batches, device, temperature, alpha, optimizer="sgd", lr=1.0):
    m = setup["module"]
    teacher = m.CharGPT(setup["teacher_cfg"]).to(device)
    teacher.load_state_dict(setup["teacher_state"])
    teacher.eval()
    model = m.CharGPT(setup["student_cfg"]).to(device)
    model.load_state_dict(setup["student_state"])
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr) if optimizer == "sgd" else torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for ids in batches:
        ids = ids.to(device)
        with torch.no_grad():
            t = teacher(ids)
        s = model(ids)
        loss = distill_loss_torch(s[:, :-1], t[:, :-1], ids[:, 1:], temperature, alpha)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, losses


def distill_loss_torch(s, t, labels, temperature, alpha):
    s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    kl = F.kl_div(F.log_softmax(s2 / temperature, -1), F.log_softmax(t2 / temperature, -1), log_target=True,
                  reduction="batchmean") * temperature ** 2
    return alpha * kl + (1 - alpha) * F.cross_entropy(s2, labels.reshape(-1))


def run_student_distill(student, setup, batches, device, temperature, alpha, optimizer="sgd", lr=1.0):
    teacher = student_char_gpt(student, setup["teacher_cfg"], setup["teacher_state"], True, device)  # TRAIN mode
    model = student_char_gpt(student, setup["student_cfg"], setup["student_state"], False, device)
    opt_cls = "torch.optim.SGD" if optimizer == "sgd" else "torch.optim.Adam"
    opt = student.lib(opt_cls).keep(model.parameters.keep(), lr=lr)
    losses = [as_float(student.distill_step(model, teacher, ids.to(device), opt, temperature, alpha), "distill_step(...)")
              for ids in batches]
    return model, teacher, losses


@pytest.mark.parametrize("temperature, alpha", [(2.0, 0.5), (4.0, 0.9)])
def test_distill_step_matches_reference(student, device, temperature, alpha, data_dir):
    setup = char_setup(data_dir)
    batches = char_batches(setup["data"], seed=int(temperature * 10), n=2)
    expected_state, expected = reference_distill(setup, batches, device, temperature, alpha)
    model, _, losses = run_student_distill(student, setup, batches, device, temperature, alpha)
    what = f"distill_step(temperature={temperature}, alpha={alpha})"
    for step, (got, want) in enumerate(zip(losses, expected), start=1):
        assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-5), (
            f"{what}, step {step}: the loss is {got:.6g}, the reference's differs")
    got_state = model.state_dict()
    for name, value in expected_state.items():
        assert name in got_state, f"{what}: the student has no parameter {name!r}"
        assert_close(got_state[name].cpu(), value, **WEIGHTS,
                     what=f"{what}: student parameter {name!r} after two SGD steps (lr 1.0)")


def test_distill_step_teacher_frozen(student, device, data_dir):
    setup = char_setup(data_dir)
    batches = char_batches(setup["data"], seed=7, n=2)
    model, teacher, _ = run_student_distill(student, setup, batches, device, 2.0, 0.5)
    assert teacher.training is False, "distill_step should put the teacher in eval mode (teacher.eval())"
    assert model.training is True, "distill_step should put the student in train mode (student.train())"
    getter = student.lib("operator.attrgetter").keep("grad")
    grads = student.lib("builtins.list")(student.lib("builtins.map").keep(getter, teacher.parameters.keep()))
    assert all(g is None for g in grads), "the teacher received gradients: run it under torch.no_grad()"
    got = teacher.state_dict()
    for name, value in setup["teacher_state"].items():
        assert_equal(got[name].cpu(), value, what=f"the teacher's parameter {name!r} after distill_step")


def test_distill_step_lowers_loss(student, device, data_dir):
    setup = char_setup(data_dir)
    m = setup["module"]
    batches = char_batches(setup["data"], seed=3, n=15)
    held_out = char_batches(setup["data"], seed=4, n=1, batch=32, held_out=True)[0].to(device)
    model, _, _ = run_student_distill(student, setup, batches, device, 2.0, 0.5, optimizer="adam", lr=3e-3)
    teacher = m.CharGPT(setup["teacher_cfg"]).to(device)
    teacher.load_state_dict(setup["teacher_state"])
    teacher.eval()

    def held_out_loss(state):
        net = m.CharGPT(setup["student_cfg"]).to(device)
        net.load_state_dict(state)
        net.eval()
        with torch.no_grad():
            return float(distill_loss_torch(net(held_out)[:, :-1], teacher(held_out)[:, :-1], held_out[:, 1:], 2.0, 0.5))

    start = held_out_loss(setup["student_state"])
    end = held_out_loss({k: v.to(device) for k, v in model.state_dict().items()})
    assert end < 0.85 * start, (
        f"15 distillation steps (Adam, lr 3e-3) took the held-out distillation loss from {start:.3f} to {end:.3f}; "
        "it should fall below 0.85 of its start")
