"""Plausible wrong implementations of lab 10 (the full Transformer, an encoder-decoder).

The first sixteen are the ones the lab's contract names; the last two are further greedy-decoding mistakes.
"""
from mutants.mutation import Mutant

FORWARD = ["test_forward_post_ln_matches_nn_transformer", "test_forward_pre_ln_matches_nn_transformer"]
EMBED_SRC = "x = self.positional(self.src_embed(src) * math.sqrt(self.d_model))"
EMBED_TGT = "x = self.positional(self.tgt_embed(tgt) * math.sqrt(self.d_model))"

MUTANTS = [
    Mutant(
        name="tgt_mask_no_look_ahead",
        why="The target mask keeps the key padding but forgets the look-ahead part: every position sees the "
            "future, so the decoder learns to copy its next input token.",
        patches=[("return look_ahead & real_keys", "return real_keys.expand(-1, -1, tgt.size(-1), -1)")],
        loses=["test_make_tgt_mask"] + FORWARD, always=True,
    ),
    Mutant(
        name="tgt_mask_no_padding",
        why="The target mask is the look-ahead mask alone: padded keys are visible to the padded query rows "
            "after them.",
        patches=[("return look_ahead & real_keys", "return look_ahead.expand(tgt.size(0), 1, -1, -1)")],
        loses=["test_make_tgt_mask"] + FORWARD, always=True,
    ),
    Mutant(
        name="tgt_mask_masks_query_rows",
        why="The widely copied tutorial mask: padding applied to the query rows "
            "((tgt != pad).unsqueeze(1).unsqueeze(3) & nopeak) instead of the keys, leaving padded rows empty.",
        patches=[("real_keys = (tgt != pad_id)[..., None, None, :]", "real_keys = (tgt != pad_id)[..., None, :, None]")],
        loses=["test_make_tgt_mask"] + FORWARD, always=True,
    ),
    Mutant(
        name="src_mask_on_decoder_self_attention",
        why="decode passes its masks positionally to the decoder, whose order is (tgt_mask, memory_mask): the "
            "source mask lands on the self-attention and the target mask on the cross-attention.",
        patches=[("return self.decoder(x, memory, tgt_mask=tgt_mask, memory_mask=src_mask)",
                  "return self.decoder(x, memory, src_mask, tgt_mask)")],
        loses=["test_encode_decode_use_given_masks", "test_forward_post_ln_matches_nn_transformer"], always=True,
    ),
    Mutant(
        name="cross_attention_on_own_input",
        why="The decoder stack gives each layer its own input as the memory: the cross-attention attends to the "
            "target instead of the encoder's output.",
        patches=[("x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask)",
                  "x = layer(x, x, tgt_mask=tgt_mask, memory_mask=memory_mask)")],
        loses=["test_decoder_stack_matches_pytorch", "test_decoder_stack_final_norm"], always=True,
    ),
    Mutant(
        name="train_no_shift",
        why="train_step feeds the whole target and scores it against itself: model(src, tgt) on tgt.",
        patches=[("tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]   # read", "tgt_in, tgt_out = tgt, tgt   # read")],
        loses=["test_train_step_matches_reference_loop"], always=True,
    ),
    Mutant(
        name="train_shift_reversed",
        why="The shift goes the wrong way: the decoder reads tgt[:, 1:] and is scored on tgt[:, :-1], i.e. "
            "it must predict the previous token.",
        patches=[("tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]   # read", "tgt_in, tgt_out = tgt[:, 1:], tgt[:, :-1]   # read")],
        loses=["test_train_step_matches_reference_loop"], always=True,
    ),
    Mutant(
        name="loss_counts_padding",
        why="The loss averages over every target position, padding included.",
        patches=[("return per_token.masked_fill(~real, 0.0).sum() / real.sum()",
                  "return per_token.mean()"),
                 ("target = tgt_out.masked_fill(~real, 0)", "target = tgt_out")],
        loses=["test_loss_matches_cross_entropy", "test_loss_label_smoothing"], always=True,
    ),
    Mutant(
        name="embedding_not_scaled",
        why="The token embeddings are not multiplied by sqrt(d_model) before the positions are added.",
        patches=[(EMBED_SRC, "x = self.positional(self.src_embed(src))"),
                 (EMBED_TGT, "x = self.positional(self.tgt_embed(tgt))")],
        loses=FORWARD, always=True,
    ),
    Mutant(
        name="embedding_scaled_twice",
        why="sqrt(d_model) is applied twice (once in an embedding helper, once in encode/decode): the embeddings "
            "are multiplied by d_model.",
        patches=[(EMBED_SRC, "x = self.positional(self.src_embed(src) * math.sqrt(self.d_model) * math.sqrt(self.d_model))"),
                 (EMBED_TGT, "x = self.positional(self.tgt_embed(tgt) * math.sqrt(self.d_model) * math.sqrt(self.d_model))")],
        loses=FORWARD, always=True,
    ),
    Mutant(
        name="decoder_without_positions",
        why="The positional encoding is added on the encoder side only: the decoder input has no positions.",
        patches=[(EMBED_TGT, "x = self.tgt_embed(tgt) * math.sqrt(self.d_model)")],
        loses=FORWARD, always=True,
    ),
    Mutant(
        name="post_ln_final_norms",
        why="Copied from nn.Transformer's constructor: the decoder stack always ends with a LayerNorm, also "
            "in Post-LN, where the paper and lab 02 have none.",
        patches=[("self.norm = nn.LayerNorm(d_model) if norm_first else None\n        ### END SOLUTION\n\n"
                  "    def forward(self, x, memory,",
                  "self.norm = nn.LayerNorm(d_model)\n        ### END SOLUTION\n\n"
                  "    def forward(self, x, memory,")],
        loses=["test_decoder_stack_final_norm", "test_model_state_dict"], always=True,
    ),
    Mutant(
        name="greedy_reencodes_every_step",
        why="greedy_decode runs the encoder again at every step (as model(src, ys) would): the same tokens, "
            "T times the encoder's cost.",
        patches=[("while ys.size(1) < max_len and not bool(done.all()):\n",
                  "while ys.size(1) < max_len and not bool(done.all()):\n"
                  "            memory = model.encode(src, src_mask)\n")],
        loses=["test_greedy_encodes_once"], always=True,
    ),
    Mutant(
        name="greedy_stops_at_first_eos",
        why="greedy_decode stops the whole batch as soon as one row emits EOS, instead of when every row has.",
        patches=[("while ys.size(1) < max_len and not bool(done.all()):",
                  "while ys.size(1) < max_len and not bool(done.any()):")],
        loses=["test_greedy_matches_generate"], always=True,
    ),
    Mutant(
        name="greedy_finished_rows_keep_emitting",
        why="Rows that have emitted EOS keep appending the model's arg-max instead of pad_id.",
        patches=[("next_id = next_id.masked_fill(done, pad_id)  # finished rows only pad", "")],
        loses=["test_greedy_matches_generate"], always=True,
    ),
    Mutant(
        name="label_smoothing_target_only",
        why="Label smoothing as (1 - eps) * NLL: the target's weight is lowered but eps / V is never spread "
            "over the classes.",
        patches=[("per_token = (1.0 - label_smoothing) * nll + label_smoothing * uniform",
                  "per_token = (1.0 - label_smoothing) * nll")],
        loses=["test_loss_label_smoothing"], always=True,
    ),
    # -- further mistakes -------------------------------------------------------------------------------------
    Mutant(
        name="greedy_runs_to_max_len",
        why="greedy_decode always runs to max_len, even when every row has emitted EOS.",
        patches=[("while ys.size(1) < max_len and not bool(done.all()):", "while ys.size(1) < max_len:")],
        loses=["test_greedy_matches_generate"],
    ),
    Mutant(
        name="greedy_without_target_mask",
        why="greedy_decode passes no target mask, reasoning that the prefix has no future: deeper decoder layers "
            "then see later positions' states when computing earlier ones.",
        patches=[("hidden = model.decode(ys, memory, src_mask, make_tgt_mask(ys, pad_id))\n            next_id",
                  "hidden = model.decode(ys, memory, src_mask, None)\n            next_id")],
        loses=["test_greedy_torch_stand_in"],
    ),
]
