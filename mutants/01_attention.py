"""Plausible wrong implementations of lab 01 (attention from scratch).

The first six (always=True) are graded on every test run; the others are further mistakes students make,
each aimed at one part of the contract so that every hidden test is shown to have teeth.
"""
from mutants.mutation import Mutant

MUTANTS = [
    # -- always graded -----------------------------------------------------------------------
    Mutant(
        name="scaled_by_d_model",
        why="Scores divided by sqrt(d_model) (the model width) instead of sqrt(d_k) (the head width). "
            "Our MultiHeadAttention delegates the scaling to scaled_dot_product_attention, so the "
            "mistake is reproduced by shrinking the per-head queries by a further sqrt(num_heads): "
            "sqrt(d_k) * sqrt(num_heads) = sqrt(d_model).",
        patches=[(
            "q = self._split_heads(self.w_q(query))",
            "q = self._split_heads(self.w_q(query)) / math.sqrt(self.num_heads)",
        )],
        loses=["test_mha_matches_nn_multihead_attention", "test_mha_masks", "test_mha_cross_attention",
               "test_mha_gradients", "test_mha_calls_student_sdpa"], always=True,
    ),
    Mutant(
        name="softmax_wrong_dim",
        why="Softmax taken over the queries (dim=-2) instead of over the keys (dim=-1), so columns "
            "rather than rows sum to one.",
        patches=[
            ("row_max = scores.amax(dim=-1, keepdim=True)", "row_max = scores.amax(dim=-2, keepdim=True)"),
            ("denom = exps.sum(dim=-1, keepdim=True)", "denom = exps.sum(dim=-2, keepdim=True)"),
        ],
        loses=["test_sdpa_matches_pytorch", "test_sdpa_masks", "test_sdpa_float64",
               "test_sdpa_extra_batch_dims", "test_sdpa_gradients", "test_sdpa_large_scores",
               "test_mha_matches_nn_multihead_attention", "test_mha_cross_attention"], always=True,
    ),
    Mutant(
        name="inverted_mask",
        why="True taken to mean 'hidden' (nn.MultiheadAttention's convention) instead of 'may attend'.",
        patches=[(
            'scores = scores.masked_fill(~mask, float("-inf"))',
            'scores = scores.masked_fill(mask, float("-inf"))',
        )],
        loses=["test_sdpa_masks", "test_sdpa_fully_masked_rows", "test_mha_masks",
               "test_mha_cross_attention", "test_mha_calls_student_sdpa"], always=True,
    ),
    Mutant(
        name="mask_after_softmax",
        why="The softmax runs over every key and the hidden weights are zeroed afterwards, so rows "
            "no longer sum to one (and hidden keys still dilute the others).",
        patches=[
            ('        scores = scores.masked_fill(~mask, float("-inf"))\n', ""),
            ("    if dropout_p > 0.0:\n        weights = F.dropout(weights, p=dropout_p)",
             "    if mask is not None:\n        weights = weights.masked_fill(~mask, 0.0)\n"
             "    if dropout_p > 0.0:\n        weights = F.dropout(weights, p=dropout_p)"),
        ],
        loses=["test_sdpa_masks", "test_sdpa_fully_masked_rows", "test_mha_masks",
               "test_mha_calls_student_sdpa"], always=True,
    ),
    Mutant(
        name="heads_split_wrong_order",
        why="Reshaping (B, L, d_model) to (B, L, d_k, num_heads) gives head h the strided features "
            "h, h + H, ... instead of the block [h*d_k:(h+1)*d_k]; the merge is its consistent inverse, "
            "so the module still runs but no longer matches nn.MultiheadAttention's weights.",
        patches=[
            ("return x.unflatten(-1, (self.num_heads, self.d_k)).transpose(-3, -2)",
             "return x.unflatten(-1, (self.d_k, self.num_heads)).movedim(-1, -3)"),
            ("return x.transpose(-3, -2).flatten(-2)", "return x.movedim(-3, -1).flatten(-2)"),
        ],
        loses=["test_mha_matches_nn_multihead_attention", "test_mha_masks", "test_mha_cross_attention",
               "test_mha_gradients", "test_mha_dropout", "test_mha_calls_student_sdpa"], always=True,
    ),
    Mutant(
        name="no_max_subtraction",
        why="Softmax without subtracting the row maximum: exp(1e4) overflows to inf and exp(-1e4) "
            "underflows to 0, giving NaN.",
        patches=[("exps = torch.exp(scores - row_max)", "exps = torch.exp(scores)")],
        loses=["test_sdpa_large_scores"], always=True,
    ),
    # -- further mistakes --------------------------------------------------------------------------
    Mutant(
        name="no_scaling",
        why="Raw dot products, never divided by sqrt(d_k).",
        patches=[("scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)", "scores = q @ k.transpose(-2, -1)")],
        loses=["test_sdpa_matches_pytorch", "test_sdpa_masks", "test_sdpa_float64", "test_sdpa_gradients",
               "test_mha_matches_nn_multihead_attention"],
    ),
    Mutant(
        name="scaled_by_d_k",
        why="Scores divided by d_k instead of sqrt(d_k).",
        patches=[("scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)", "scores = q @ k.transpose(-2, -1) / d_k")],
        loses=["test_sdpa_matches_pytorch", "test_sdpa_extra_batch_dims", "test_mha_matches_nn_multihead_attention"],
    ),
    Mutant(
        name="nan_on_fully_masked_rows",
        why="A plain softmax after filling with -inf: rows with every key masked become NaN.",
        patches=[(
            "row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))",
            "pass",
        ), (
            "weights = exps / torch.where(denom > 0, denom, torch.ones_like(denom))",
            "weights = exps / denom",
        )],
        loses=["test_sdpa_fully_masked_rows", "test_sdpa_gradients", "test_mha_masks",
               "test_mha_cross_attention"],
    ),
    Mutant(
        name="large_negative_instead_of_inf",
        why="Masked scores set to -1e9 instead of -inf: a fully masked row becomes uniform over the "
            "hidden keys instead of all zeros.",
        patches=[('scores = scores.masked_fill(~mask, float("-inf"))', "scores = scores.masked_fill(~mask, -1e9)")],
        loses=["test_sdpa_fully_masked_rows", "test_mha_masks"],
    ),
    Mutant(
        name="weights_before_dropout",
        why="Dropout is applied to the values' mixing but the weights returned are those before dropout.",
        patches=[(
            "    if dropout_p > 0.0:\n        weights = F.dropout(weights, p=dropout_p)\n\n    output = weights @ v\n    return output, weights",
            "    used = F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights\n\n    output = used @ v\n    return output, weights",
        )],
        loses=["test_sdpa_dropout", "test_mha_dropout"],
    ),
    Mutant(
        name="casts_to_float32",
        why="Computes in float32 whatever the input dtype, so float64 inputs lose precision and dtype.",
        patches=[("    d_k = q.size(-1)\n", "    d_k = q.size(-1)\n    q, k, v = q.float(), k.float(), v.float()\n")],
        loses=["test_sdpa_float64", "test_sdpa_large_scores", "test_sdpa_gradients",
               "test_mha_matches_nn_multihead_attention"],
    ),
    Mutant(
        name="detached_weights",
        why="The weights are detached before mixing the values, so no gradient reaches q and k.",
        patches=[("    output = weights @ v\n", "    output = weights.detach() @ v\n")],
        loses=["test_sdpa_gradients", "test_mha_gradients"],
    ),
    Mutant(
        name="causal_top_left",
        why="Causal mask aligned top-left (j <= i, like is_causal=True) instead of bottom-right.",
        patches=[("return torch.tril(allowed, diagonal=k_len - q_len)", "return torch.tril(allowed)")],
        loses=["test_make_causal_mask"],
    ),
    Mutant(
        name="padding_mask_wrong_axes",
        why="Padding mask shaped (B, 1, L, 1): it hides query rows instead of key columns.",
        patches=[("return (token_ids != pad_id)[..., None, None, :]", "return (token_ids != pad_id)[:, None, :, None]")],
        loses=["test_make_padding_mask"],
    ),
    Mutant(
        name="padding_mask_inverted",
        why="Padding mask True at the padding (the 'key_padding_mask' convention of nn.MultiheadAttention).",
        patches=[("return (token_ids != pad_id)[..., None, None, :]", "return (token_ids == pad_id)[..., None, None, :]")],
        loses=["test_make_padding_mask"],
    ),
    Mutant(
        name="dropout_in_eval_mode",
        why="MultiHeadAttention applies dropout whether or not it is training.",
        patches=[("dropout_p = self.dropout if self.training else 0.0", "dropout_p = self.dropout")],
        loses=["test_mha_dropout"],
    ),
    Mutant(
        name="assert_instead_of_value_error",
        why="An assert (AssertionError) instead of a ValueError for d_model not divisible by num_heads.",
        patches=[(
            "        if d_model % num_heads != 0:\n            raise ValueError(\n"
            "                f\"d_model ({d_model}) must be divisible by num_heads ({num_heads})\")\n",
            "        assert d_model % num_heads == 0, \"d_model must be divisible by num_heads\"\n",
        )],
        loses=["test_mha_invalid_heads_raises_value_error"],
    ),
    Mutant(
        name="fused_qkv_projection",
        why="One fused nn.Linear(d_model, 3 * d_model) named qkv instead of w_q, w_k, w_v: the "
            "parameters no longer have the contract's names.",
        patches=[
            ("        self.w_q = nn.Linear(d_model, d_model, bias=bias)\n"
             "        self.w_k = nn.Linear(d_model, d_model, bias=bias)\n"
             "        self.w_v = nn.Linear(d_model, d_model, bias=bias)\n",
             "        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)\n"),
            ("        q = self._split_heads(self.w_q(query))\n"
             "        k = self._split_heads(self.w_k(key))\n"
             "        v = self._split_heads(self.w_v(value))\n",
             "        w_q, w_k, w_v = self.qkv.weight.chunk(3)\n"
             "        b_q, b_k, b_v = self.qkv.bias.chunk(3) if self.qkv.bias is not None else (None,) * 3\n"
             "        q = self._split_heads(F.linear(query, w_q, b_q))\n"
             "        k = self._split_heads(F.linear(key, w_k, b_k))\n"
             "        v = self._split_heads(F.linear(value, w_v, b_v))\n"),
        ],
        loses=["test_mha_structure", "test_mha_matches_nn_multihead_attention", "test_mha_gradients"],
    ),
    Mutant(
        name="attention_inlined_in_module",
        why="MultiHeadAttention recomputes attention itself (correctly) instead of calling the "
            "notebook's scaled_dot_product_attention.",
        patches=[(
            "        out, weights = scaled_dot_product_attention(q, k, v, mask=mask, dropout_p=dropout_p)\n",
            "        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_k)\n"
            "        if mask is not None:\n"
            "            scores = scores.masked_fill(~mask.bool(), float(\"-inf\"))\n"
            "        weights = torch.nan_to_num(torch.softmax(scores, dim=-1))\n"
            "        weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0)\n"
            "        out = weights @ v\n",
        )],
        loses=["test_mha_calls_student_sdpa"],
    ),
    Mutant(
        name="plot_transposed",
        why="The heatmap is drawn with keys on the rows and queries on the columns.",
        patches=[("image = ax.imshow(weights.numpy(), cmap=\"viridis\", aspect=\"auto\")",
                  "image = ax.imshow(weights.T.numpy(), cmap=\"viridis\", aspect=\"auto\")")],
        loses=["test_plot_attention_heatmap", "test_plot_attention_tick_labels"],
    ),
    Mutant(
        name="plot_labels_swapped",
        why="Query tokens on the x axis and key tokens on the y axis.",
        patches=[
            ("ax.set_xticks(range(len(key_tokens)), labels=list(key_tokens), rotation=90)",
             "ax.set_xticks(range(len(query_tokens)), labels=list(query_tokens), rotation=90)"),
            ("ax.set_yticks(range(len(query_tokens)), labels=list(query_tokens))",
             "ax.set_yticks(range(len(key_tokens)), labels=list(key_tokens))"),
        ],
        loses=["test_plot_attention_tick_labels"],
    ),
    Mutant(
        name="plot_no_colorbar",
        why="No colorbar.",
        patches=[("    ax.figure.colorbar(image, ax=ax)\n", "")],
        loses=["test_plot_attention_heatmap"],
    ),
    Mutant(
        name="plot_ignores_given_ax",
        why="Always draws into a new figure, ignoring the ax argument.",
        patches=[("    if ax is None:\n        _, ax = plt.subplots(", "    if True:\n        _, ax = plt.subplots(")],
        loses=["test_plot_attention_heatmap", "test_plot_attention_tick_labels"],
    ),
]
