"""Plausible wrong implementations of lab 08 (inside Llama, and LoRA).

Each is one of the bugs the lab's contract names; `loses` lists the cheap tests that catch it.
"""
from mutants.mutation import Mutant

MUTANTS = [
    Mutant(
        name="layernorm_instead_of_rmsnorm",
        why="RMSNorm subtracts each row's mean first (LayerNorm without a bias): Llama's norm does not centre.",
        patches=[("h = x.to(compute)\n", "h = x.to(compute)\n        h = h - h.mean(dim=-1, keepdim=True)\n")],
        loses=["test_rmsnorm_matches_torch", "test_rmsnorm_small_activations"], always=True,
    ),
    Mutant(
        name="eps_outside_sqrt",
        why="x / (sqrt(mean(x^2)) + eps) instead of x / sqrt(mean(x^2) + eps): wrong where activations are "
            "small (x^2 ~ eps).",
        patches=[("h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps)",
                  "h = h / (h.pow(2).mean(dim=-1, keepdim=True).sqrt() + self.eps)")],
        loses=["test_rmsnorm_small_activations"], always=True,
    ),
    Mutant(
        name="rmsnorm_no_upcast",
        why="RMSNorm computes mean(x^2) in the input's dtype: in float16, x^2 overflows once |x| > 256 and "
            "the row normalises to 0.",
        patches=[("compute = torch.promote_types(x.dtype, torch.float32)", "compute = x.dtype")],
        loses=["test_rmsnorm_half_precision"], always=True,
    ),
    Mutant(
        name="silu_on_up_projection",
        why="SiLU applied to the up projection as well as the gate: silu(gate(x)) * silu(up(x)).",
        patches=[("F.silu(self.gate_proj(x)) * self.up_proj(x)", "F.silu(self.gate_proj(x)) * F.silu(self.up_proj(x))")],
        loses=["test_swiglu_matches_llama_mlp", "test_decoder_layer_matches_llama"], always=True,
    ),
    Mutant(
        name="silu_on_product",
        why="SiLU applied after the product: silu(gate(x) * up(x)).",
        patches=[("F.silu(self.gate_proj(x)) * self.up_proj(x)", "F.silu(self.gate_proj(x) * self.up_proj(x))")],
        loses=["test_swiglu_matches_llama_mlp", "test_decoder_layer_matches_llama"], always=True,
    ),
    Mutant(
        name="gate_up_swapped",
        why="The gate and up projections swapped: silu(up(x)) * gate(x), so the checkpoint's gate weights "
            "land on the linear path.",
        patches=[("F.silu(self.gate_proj(x)) * self.up_proj(x)", "F.silu(self.up_proj(x)) * self.gate_proj(x)")],
        loses=["test_swiglu_matches_llama_mlp", "test_decoder_layer_matches_llama"], always=True,
    ),
    Mutant(
        name="repeat_kv_tiled",
        why="repeat_kv tiles the kv heads (x.repeat: head h reads kv head h % n_kv) instead of interleaving "
            "them (h // n_rep); the two agree only when n_kv or n_rep is 1.",
        patches=[("return torch.repeat_interleave(x, n_rep, dim=-3)",
                  "return x.repeat(*([1] * (x.dim() - 3)), n_rep, 1, 1)")],
        loses=["test_repeat_kv_matches_transformers", "test_attention_matches_llama_attention"], always=True,
    ),
    Mutant(
        name="rope_interleaved",
        why="RoPE in GPT-J's interleaved layout (pairs 2i, 2i+1) where transformers' Llama weights expect "
            "the half-split pairs (i, i + d/2).",
        patches=[("q = apply_rope(q, position_ids, base=self.rope_theta)\n        k = apply_rope(k, position_ids, base=self.rope_theta)",
                  "q = apply_rope(q, position_ids, base=self.rope_theta, interleaved=True)\n"
                  "        k = apply_rope(k, position_ids, base=self.rope_theta, interleaved=True)")],
        loses=["test_attention_matches_llama_attention", "test_attention_position_ids"], always=True,
    ),
    Mutant(
        name="scaling_by_head_dim",
        why="The scores are divided by head_dim instead of sqrt(head_dim) (the queries are pre-scaled by "
            "1/sqrt(head_dim) before the sdpa, which divides by sqrt(head_dim) again).",
        patches=[("out, _ = scaled_dot_product_attention(q, k, v, mask)",
                  "out, _ = scaled_dot_product_attention(q / math.sqrt(self.head_dim), k, v, mask)")],
        loses=["test_attention_matches_llama_attention", "test_attention_position_ids"], always=True,
    ),
    Mutant(
        name="untied_embeddings",
        why="lm_head keeps a weight of its own even when tie_word_embeddings=True: loading a full state "
            "dict hides it, a checkpoint without lm_head.weight does not.",
        patches=[("            self.lm_head.weight = self.model.embed_tokens.weight   # one Parameter, two names\n", "")],
        loses=["test_model_tied_embeddings"], always=True,
    ),
    Mutant(
        name="lora_b_random",
        why="lora_B is initialised at random like lora_A, so the adapted layer no longer starts as the base layer.",
        patches=[("self.lora_B = nn.Parameter(torch.zeros(", "self.lora_B = nn.Parameter(torch.randn(")],
        loses=["test_lora_init"], always=True,
    ),
    Mutant(
        name="scaling_alpha_not_alpha_over_r",
        why="scaling = alpha instead of alpha / r (only visible when r > 1).",
        patches=[("self.r, self.alpha, self.scaling = r, alpha, alpha / r", "self.r, self.alpha, self.scaling = r, alpha, alpha")],
        loses=["test_lora_init", "test_lora_forward_matches_peft", "test_lora_merge_unmerge"], always=True,
    ),
    Mutant(
        name="merge_without_scaling",
        why="merge() adds B @ A without the alpha / r scaling (only visible when alpha != r; peft#2489).",
        patches=[("self.base_layer.weight += self.delta_weight()", "self.base_layer.weight += self.lora_B @ self.lora_A")],
        loses=["test_lora_merge_unmerge"], always=True,
    ),
    Mutant(
        name="unmerge_does_not_restore",
        why="unmerge() only clears the flag: the base weight keeps the merged update, counted twice from then on.",
        patches=[("                self.base_layer.weight -= self.delta_weight()\n", "                pass\n")],
        loses=["test_lora_merge_unmerge"], always=True,
    ),
    Mutant(
        name="base_left_trainable",
        why="Neither LoRALinear nor add_lora freezes the base model: every weight trains.",
        patches=[
            ("        for p in base_layer.parameters():\n            p.requires_grad_(False)\n", ""),
            ("    for p in model.parameters():\n        p.requires_grad_(False)\n", ""),
        ],
        loses=["test_lora_init", "test_add_lora_matches_peft"], always=True,
    ),
    Mutant(
        name="lora_on_every_linear",
        why="add_lora wraps every nn.Linear (lm_head and the MLP included) whatever target_modules says.",
        patches=[("if isinstance(module, nn.Linear) and name.rsplit(\".\", 1)[-1] in targets]",
                  "if isinstance(module, nn.Linear)]")],
        loses=["test_add_lora_matches_peft"], always=True,
    ),
    Mutant(
        name="eos_masked_as_padding",
        why="The labels mask every position where input_ids == pad_id: with pad = eos the answer's EOS gets "
            "no label and the model never learns to stop.",
        patches=[("    return {\"input_ids\": input_ids, \"attention_mask\": attention_mask, \"labels\": labels}",
                  "    labels[input_ids == int(pad_id)] = -100\n"
                  "    attention_mask[input_ids == int(pad_id)] = 0\n"
                  "    return {\"input_ids\": input_ids, \"attention_mask\": attention_mask, \"labels\": labels}")],
        loses=["test_build_qa_batch"], always=True,
    ),
]
