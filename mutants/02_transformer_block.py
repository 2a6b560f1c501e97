"""Plausible wrong implementations of lab 02 (the encoder block, stacked); each must lose points."""
from mutants.mutation import Mutant

ENCODER_PRE_LN = (
    "            h = self.norm1(x)\n"
    "            x = x + self.dropout1(self.self_attn(h, h, h, mask)[0])\n"
    "            x = x + self.dropout2(self.ffn(self.norm2(x)))\n"
)
ENCODER_POST_LN = (
    "            x = self.norm1(x + self.dropout1(self.self_attn(x, x, x, mask)[0]))\n"
    "            x = self.norm2(x + self.dropout2(self.ffn(x)))\n"
)
ACTIVATION = 'self.activation = F.relu if activation == "relu" else F.gelu'
FFN_FORWARD = "return self.linear2(self.dropout(self.activation(self.linear1(x))))"
ENCODER_LAYERS = (
    "        self.layers = nn.ModuleList(\n"
    "            TransformerEncoderLayer(d_model, num_heads, d_ff, dropout=dropout,\n"
    "                                    activation=activation, norm_first=norm_first)\n"
    "            for _ in range(num_layers)\n"
    "        )\n"
)

MUTANTS = [
    Mutant(
        "pre_ln_residual_adds_normalised_input",
        "Pre-LN residual adds norm(x) instead of x: x = norm(x) + sublayer(norm(x))",
        [(ENCODER_PRE_LN,
          "            h = self.norm1(x)\n"
          "            x = h + self.dropout1(self.self_attn(h, h, h, mask)[0])\n"
          "            h = self.norm2(x)\n"
          "            x = h + self.dropout2(self.ffn(h))\n")],
        ["test_encoder_layer_matches_pytorch", "test_encoder_layer_masks", "test_encoder_layer_gradients",
         "test_encoder_stack_matches_pytorch", "test_float32"], always=True,
    ),
    Mutant(
        "pre_and_post_ln_swapped",
        "norm_first=True runs Post-LN and norm_first=False runs Pre-LN",
        [("        if self.norm_first:\n            # The sublayers read a normalised copy",
          "        if not self.norm_first:\n            # The sublayers read a normalised copy")],
        ["test_encoder_layer_matches_pytorch", "test_encoder_layer_default_arguments", "test_encoder_layer_masks",
         "test_encoder_stack_matches_pytorch", "test_encoder_final_norm"], always=True,
    ),
    Mutant(
        "final_pre_ln_norm_not_applied",
        "the Pre-LN stack creates its final LayerNorm but never applies it",
        [("        if self.norm is not None:\n            x = self.norm(x)\n", "")],
        ["test_encoder_stack_matches_pytorch", "test_encoder_final_norm", "test_encoder_stack_gradients"],
    ),
    Mutant(
        "final_pre_ln_norm_missing",
        "the Pre-LN stack has no final LayerNorm at all",
        [("self.norm = nn.LayerNorm(d_model) if norm_first else None", "self.norm = None")],
        ["test_encoder_final_norm", "test_parameter_names", "test_encoder_stack_matches_pytorch"], always=True,
    ),
    Mutant(
        "post_ln_stack_with_final_norm",
        "a final LayerNorm on the Post-LN stack too",
        [("self.norm = nn.LayerNorm(d_model) if norm_first else None", "self.norm = nn.LayerNorm(d_model)")],
        ["test_encoder_final_norm", "test_parameter_names", "test_encoder_defaults"],
    ),
    Mutant(
        "tanh_approximate_gelu",
        "GELU computed with the tanh approximation instead of the exact erf form",
        [(ACTIVATION, 'self.activation = F.relu if activation == "relu" else '
                      '(lambda z: F.gelu(z, approximate="tanh"))')],
        ["test_ffn_matches_reference", "test_encoder_layer_matches_pytorch", "test_decoder_layer_matches_pytorch"],
    ),
    Mutant(
        "activation_ignored",
        "always ReLU, whatever the activation argument says",
        [(ACTIVATION, "self.activation = F.relu")],
        ["test_ffn_matches_reference", "test_encoder_layer_matches_pytorch", "test_encoder_stack_matches_pytorch",
         "test_decoder_layer_matches_pytorch"],
    ),
    Mutant(
        "ffn_dropout_on_output",
        "the FFN's dropout applied after linear2 instead of after the activation",
        [(FFN_FORWARD, "return self.dropout(self.linear2(self.activation(self.linear1(x))))")],
        ["test_dropout_in_training"],
    ),
    Mutant(
        "dropout_always_on",
        "F.dropout without training=self.training: dropout stays on in eval mode",
        [(FFN_FORWARD, "return self.linear2(F.dropout(self.activation(self.linear1(x)), p=self.dropout.p))")],
        ["test_dropout_off_in_eval"],
    ),
    Mutant(
        "no_residual_dropout",
        "Post-LN encoder layer without dropout on the sublayer outputs",
        [(ENCODER_POST_LN,
          "            x = self.norm1(x + self.self_attn(x, x, x, mask)[0])\n"
          "            x = self.norm2(x + self.ffn(x))\n")],
        ["test_dropout_in_training"],
    ),
    Mutant(
        "layer_norm_eps_ignored",
        "the encoder layer's LayerNorms use the default eps whatever layer_norm_eps says",
        [("self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)\n"
          "        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)\n"
          "        # Residual dropout",
          "self.norm1 = nn.LayerNorm(d_model)\n"
          "        self.norm2 = nn.LayerNorm(d_model)\n"
          "        # Residual dropout")],
        ["test_encoder_layer_layer_norm_eps"],
    ),
    Mutant(
        "stack_drops_the_mask",
        "the encoder stack calls its layers without the mask",
        [("            x = layer(x, mask)\n", "            x = layer(x)\n")],
        ["test_encoder_stack_matches_pytorch", "test_encoder_stack_gradients"],
    ),
    Mutant(
        "one_layer_shared_by_the_stack",
        "the same layer object repeated num_layers times (shared weights)",
        [(ENCODER_LAYERS,
          "        layer = TransformerEncoderLayer(d_model, num_heads, d_ff, dropout=dropout,\n"
          "                                        activation=activation, norm_first=norm_first)\n"
          "        self.layers = nn.ModuleList([layer] * num_layers)\n")],
        ["test_parameter_names", "test_encoder_stack_matches_pytorch"],
    ),
    Mutant(
        "decoder_normalises_memory",
        "Pre-LN decoder normalises the memory with norm2 as well as the queries",
        [("x = x + self.dropout2(self.cross_attn(self.norm2(x), memory, memory, memory_mask)[0])",
          "m = self.norm2(memory)\n"
          "            x = x + self.dropout2(self.cross_attn(self.norm2(x), m, m, memory_mask)[0])")],
        ["test_decoder_layer_matches_pytorch", "test_decoder_layer_masks", "test_decoder_layer_gradients"],
    ),
    Mutant(
        "decoder_builds_its_own_causal_mask",
        "the decoder layer makes a causal mask when tgt_mask is None",
        [("    def forward(self, x, memory, tgt_mask=None, memory_mask=None):\n        ### BEGIN SOLUTION\n",
          "    def forward(self, x, memory, tgt_mask=None, memory_mask=None):\n        ### BEGIN SOLUTION\n"
          "        if tgt_mask is None:\n"
          "            tgt_mask = make_causal_mask(x.shape[1], device=x.device)\n")],
        ["test_decoder_layer_masks"],
    ),
    Mutant(
        "decoder_pre_and_post_ln_swapped",
        "the decoder layer runs Post-LN for norm_first=True and Pre-LN for False",
        [("        if self.norm_first:\n            h = self.norm1(x)\n            x = x + self.dropout1(self.self_attn(h, h, h, tgt_mask)[0])",
          "        if not self.norm_first:\n            h = self.norm1(x)\n            x = x + self.dropout1(self.self_attn(h, h, h, tgt_mask)[0])")],
        ["test_decoder_layer_matches_pytorch", "test_decoder_layer_masks", "test_decoder_layer_gradients"],
    ),
]
