"""Plausible wrong implementations of lab 07 (a character-level GPT from scratch, with a KV cache).

One per bug the lab's contract names; each loses points on the tests it lists.
"""
from mutants.mutation import Mutant

MUTANTS = [
    Mutant(
        name="cache_wrong_layout",
        why="The KV cache is kept as (B, T, n_head, head_dim), before the transpose, instead of GPT-2's "
            "(B, n_head, T, head_dim): transformers' cache cannot be fed in, and T_past is read from the wrong axis.",
        patches=[
            ("            k = torch.cat([past_kv[0], k], dim=2)                           # time is dim 2\n"
             "            v = torch.cat([past_kv[1], v], dim=2)",
             "            k = torch.cat([past_kv[0].transpose(1, 2), k], dim=2)\n"
             "            v = torch.cat([past_kv[1].transpose(1, 2), v], dim=2)"),
            ("return self.resid_dropout(self.c_proj(y)), (k, v)",
             "return self.resid_dropout(self.c_proj(y)), (k.transpose(1, 2), v.transpose(1, 2))"),
        ],
        loses=["test_attention_matches_gpt2", "test_kv_cache_matches_recompute"], always=True,
    ),
    Mutant(
        name="cache_chunk_unmasked",
        why="No mask when there is a cache: right for one new token, wrong for a chunk of several new tokens, "
            "which then see each other's future.",
        patches=[(
            "        mask = make_causal_mask(T, k.shape[2], device=x.device)\n"
            "        scores = scores.masked_fill(~mask, float(\"-inf\"))",
            "        if past_kv is None:   # with a cache, every key is in the past\n"
            "            mask = make_causal_mask(T, k.shape[2], device=x.device)\n"
            "            scores = scores.masked_fill(~mask, float(\"-inf\"))",
        )],
        loses=["test_attention_matches_gpt2", "test_kv_cache_matches_recompute"], always=True,
    ),
    Mutant(
        name="is_causal_with_cache",
        why="F.scaled_dot_product_attention(is_causal=True) aligns its triangle top-left: with a cache the new "
            "queries see only the first keys (pytorch/pytorch#144858).",
        patches=[(
            "        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)                  # (B, H, T, T_past + T)\n",
            "        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,\n"
            "                                           dropout_p=self.attn_dropout.p if self.training else 0.0)\n"
            "        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C))), (k, v)\n"
            "        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hd)\n",
        )],
        loses=["test_attention_matches_gpt2", "test_kv_cache_matches_recompute"], always=True,
    ),
    Mutant(
        name="positions_restart_with_cache",
        why="The position embeddings always start at 0, so a token fed with a cache gets position 0 instead "
            "of T_past.",
        patches=[("pos = torch.arange(t_past, t_past + T, device=idx.device)", "pos = torch.arange(T, device=idx.device)")],
        loses=["test_kv_cache_matches_recompute", "test_generate_greedy_matches_gpt2"], always=True,
    ),
    Mutant(
        name="mask_diagonal_leaks",
        why="The causal mask's diagonal is off by one: each position also sees the next token (its target).",
        patches=[("        mask = make_causal_mask(T, k.shape[2], device=x.device)",
                  "        mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T + 1)")],
        loses=["test_causality", "test_logits_match_gpt2", "test_attention_matches_gpt2"], always=True,
    ),
    Mutant(
        name="exact_gelu",
        why="nn.GELU's exact erf form (today's nanoGPT) instead of GPT-2's tanh approximation (gelu_new).",
        patches=[('F.gelu(self.c_fc(x), approximate="tanh")', "F.gelu(self.c_fc(x))")],
        loses=["test_logits_match_gpt2", "test_block_matches_gpt2"], always=True,
    ),
    Mutant(
        name="tie_by_new_parameter",
        why="lm_head.weight = nn.Parameter(wte.weight): a second Parameter (sharing storage today), not the "
            "same object, so the model has one parameter too many.",
        patches=[("self.lm_head.weight = self.transformer.wte.weight   # tying: one Parameter, two names",
                  "self.lm_head.weight = nn.Parameter(self.transformer.wte.weight)")],
        loses=["test_weight_tying"], always=True,
    ),
    Mutant(
        name="converter_transposes_by_shape",
        why="The converter transposes the non-square weights of the blocks, deciding by shape: the square "
            "attn.c_proj stays in Conv1D's (in, out) layout.",
        patches=[("out[name] = value.t().clone() if name.endswith(conv1d) else value.clone()",
                  "square = value.dim() == 2 and value.shape[0] == value.shape[1]\n"
                  "        out[name] = value.t().clone() if \".h.\" in name and value.dim() == 2 and not square "
                  "else value.clone()")],
        loses=["test_convert_gpt2_state_dict"], always=True,
    ),
    Mutant(
        name="loss_shifted_twice",
        why="The model shifts the (already shifted) targets again, as GPT2LMHeadModel(labels=...) does: each "
            "position is scored against the token two ahead, and the last position is never scored.",
        patches=[("loss = F.cross_entropy(logits.reshape(B * T, -1), targets.reshape(B * T), ignore_index=-100)",
                  "loss = F.cross_entropy(logits[:, :-1].reshape(B * (T - 1), -1), targets[:, 1:].reshape(B * (T - 1)),\n"
                  "                                   ignore_index=-100)")],
        loses=["test_loss_pre_shifted_targets"], always=True,
    ),
    Mutant(
        name="weight_decay_on_everything",
        why="One parameter group with weight decay: biases and LayerNorm parameters are decayed too.",
        patches=[('groups = [{"params": decay, "weight_decay": weight_decay},\n'
                  '              {"params": no_decay, "weight_decay": 0.0}]',
                  'groups = [{"params": params, "weight_decay": weight_decay}]')],
        loses=["test_configure_optimizer"], always=True,
    ),
    Mutant(
        name="cosine_missing_min_lr",
        why="The cosine's progress lacks the + 1, so the last step a loop takes (max_iters - 1) never reaches "
            "min_lr (the bug of the course's char-GPT trainer).",
        patches=[("progress = (it - warmup_iters + 1) / (max_iters - warmup_iters)",
                  "progress = (it - warmup_iters) / (max_iters - warmup_iters)")],
        loses=["test_get_lr"], always=True,
    ),
    Mutant(
        name="per_parameter_clipping",
        why="Each gradient is clipped to max_norm on its own, which changes the update's direction; the "
            "returned total norm is still right.",
        patches=[("    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)\n"
                  "    for g in grads:\n"
                  "        g.detach().mul_(coef.to(g.dtype))",
                  "    for g in grads:\n"
                  "        g.detach().mul_(torch.clamp(max_norm / (torch.linalg.vector_norm(g) + 1e-6), max=1.0))")],
        loses=["test_clip_grad_norm"], always=True,
    ),
    Mutant(
        name="argmax_instead_of_sampling",
        why="generate takes the most likely token instead of drawing from the distribution.",
        patches=[("next_id = torch.multinomial(probs, num_samples=1, generator=generator)",
                  "next_id = probs.argmax(dim=-1, keepdim=True)")],
        loses=["test_generate_sampling_distribution"], always=True,
    ),
    Mutant(
        name="sliding_cache_past_block_size",
        why="Once the cache is full, its oldest position is dropped and the new token appended: the cached "
            "keys keep their old learned positions, so the logits differ from the cropped recompute.",
        patches=[("        if use_cache and past_kv is not None and past_kv[0][0].shape[2] < block_size:\n"
                  "            logits, _, past_kv = model(idx[:, -1:], past_kv=past_kv)       # the newest token only",
                  "        if use_cache and past_kv is not None:\n"
                  "            if past_kv[0][0].shape[2] >= block_size:   # slide: drop the oldest position\n"
                  "                past_kv = [(k[:, :, 1:], v[:, :, 1:]) for k, v in past_kv]\n"
                  "            logits, _, past_kv = model(idx[:, -1:], past_kv=past_kv)")],
        loses=["test_generate_past_block_size"], always=True,
    ),
    Mutant(
        name="cache_never_used",
        why="generate keeps the model's cache under another name, so past_kv stays None and every step "
            "recomputes the whole window: right tokens, no speed-up.",
        patches=[("            logits, _, past_kv = model(idx[:, -block_size:])\n"
                  "            if not use_cache:\n"
                  "                past_kv = None",
                  "            logits, _, present_kv = model(idx[:, -block_size:])")],
        loses=["test_generate_uses_cache"], always=True,
    ),
]
