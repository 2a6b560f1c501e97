"""Plausible wrong implementations of lab 09 (DPO and knowledge distillation).

One per mistake the lab's contract lists among its tricky points; each loses points on the tests it
names.
"""
from mutants.mutation import Mutant

SUM_TESTS = ["test_sequence_logprobs_matches_gather", "test_sequence_logprobs_gpt2_loss"]

MUTANTS = [
    # -- sequence_logprobs ---------------------------------------------------------------------------
    Mutant(
        name="no_shift",
        why="Scores labels[t] with logits[t] (the model's prediction of the NEXT token), without the shift.",
        patches=[("shifted_logits = logits[..., :-1, :]\n    shifted_labels = labels[..., 1:]\n"
                  "    scored = loss_mask[..., 1:] != 0",
                  "shifted_logits = logits\n    shifted_labels = labels\n    scored = loss_mask != 0")],
        loses=SUM_TESTS, always=True,
    ),
    Mutant(
        name="mask_sliced_like_logits",
        why="Shifts the logits and labels but slices the mask like the logits ([:-1]): the first response "
            "token is dropped and the token after the response (a pad or the next row's junk) is scored.",
        patches=[("scored = loss_mask[..., 1:] != 0", "scored = loss_mask[..., :-1] != 0")],
        loses=SUM_TESTS, always=True,
    ),
    Mutant(
        name="mean_instead_of_sum",
        why="Averages the response's token log-probabilities where DPO's log pi(y|x) is their sum.",
        patches=[("total = token_logps.sum(dim=-1)\n",
                  "total = token_logps.sum(dim=-1) / scored.sum(dim=-1).clamp(min=1)\n")],
        loses=SUM_TESTS, always=True,
    ),
    Mutant(
        name="log_softmax_dim_1",
        why="log_softmax over dim=1, the classification habit: on (B, L, V) logits that normalises over "
            "the positions, not the vocabulary.",
        patches=[("torch.log_softmax(shifted_logits, dim=-1)", "torch.log_softmax(shifted_logits, dim=1)")],
        loses=SUM_TESTS, always=True,
    ),
    # -- collate_preferences -------------------------------------------------------------------------
    Mutant(
        name="masks_from_pad_id",
        why="Builds the masks from the token ids (input_ids != pad): with pad == EOS the real EOS is "
            "neither attended nor scored.",
        patches=[('    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}',
                  '    attention_mask = (input_ids != pad_token_id).long()\n'
                  '    loss_mask = loss_mask * attention_mask\n'
                  '    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}')],
        loses=["test_collate_eos_pad_equal"], always=True,
    ),
    # -- dpo_loss ------------------------------------------------------------------------------------
    Mutant(
        name="reference_terms_swapped",
        why="Subtracts the reference's rejected log-prob from the chosen one and vice versa.",
        patches=[("chosen_logratios = policy_chosen_logps - ref_chosen_logps\n"
                  "    rejected_logratios = policy_rejected_logps - ref_rejected_logps",
                  "chosen_logratios = policy_chosen_logps - ref_rejected_logps\n"
                  "    rejected_logratios = policy_rejected_logps - ref_chosen_logps")],
        loses=["test_dpo_loss_matches_trl"], always=True,
    ),
    Mutant(
        name="reference_omitted",
        why="Leaves the reference out: the loss and rewards use the policy's log-probs alone.",
        patches=[("chosen_logratios = policy_chosen_logps - ref_chosen_logps\n"
                  "    rejected_logratios = policy_rejected_logps - ref_rejected_logps",
                  "chosen_logratios = policy_chosen_logps\n"
                  "    rejected_logratios = policy_rejected_logps")],
        loses=["test_dpo_loss_matches_trl"], always=True,
    ),
    Mutant(
        name="beta_outside_sigmoid",
        why="Multiplies the log-sigmoid by beta instead of its argument.",
        patches=[("logits = beta * (chosen_logratios - rejected_logratios)\n"
                  "    # logsigmoid is stable for any margin; log(sigmoid(x)) is -inf below x = -88.7 in float32.\n"
                  "    losses = -(1 - label_smoothing)",
                  "logits = chosen_logratios - rejected_logratios\n"
                  "    losses = -beta * (1 - label_smoothing)")],
        loses=["test_dpo_loss_matches_trl"], always=True,
    ),
    Mutant(
        name="log_of_sigmoid",
        why="torch.log(torch.sigmoid(x)): the loss is inf (its gradient NaN) for large negative margins.",
        patches=[("losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)",
                  "losses = (-(1 - label_smoothing) * torch.log(torch.sigmoid(logits))\n"
                  "              - label_smoothing * torch.log(torch.sigmoid(-logits)))")],
        loses=["test_dpo_loss_large_margins"], always=True,
    ),
    Mutant(
        name="rewards_not_detached",
        why="Returns the rewards attached to the graph.",
        patches=[("chosen_rewards = (beta * chosen_logratios).detach()", "chosen_rewards = beta * chosen_logratios"),
                 ("rejected_rewards = (beta * rejected_logratios).detach()", "rejected_rewards = beta * rejected_logratios")],
        loses=["test_dpo_loss_rewards_detached_gradients"], always=True,
    ),
    Mutant(
        name="label_smoothing_sign",
        why="Adds the flipped-label term instead of subtracting it (-eps * logsigmoid(-beta h)).",
        patches=[("- label_smoothing * F.logsigmoid(-logits)", "+ label_smoothing * F.logsigmoid(-logits)")],
        loses=["test_dpo_loss_label_smoothing"], always=True,
    ),
    # -- dpo_step ------------------------------------------------------------------------------------
    Mutant(
        name="reference_train_mode",
        why="Never puts the reference in eval mode: it keeps its dropout, so its log-probs are noisy.",
        patches=[("    policy.train()\n    reference.eval()\n", "    policy.train()\n")],
        loses=["test_dpo_step_matches_reference", "test_dpo_step_frozen_reference"], always=True,
    ),
    Mutant(
        name="reference_with_gradients",
        why="Runs the reference outside torch.no_grad(): backward() fills its .grad.",
        patches=[("    with torch.no_grad():\n        ref_logps = ", "    if True:\n        ref_logps = ")],
        loses=["test_dpo_step_frozen_reference"], always=True,
    ),
    Mutant(
        name="sum_over_pairs",
        why="Optimises the sum of the per-pair losses instead of their mean.",
        patches=[("loss = losses.mean()", "loss = losses.sum()")],
        loses=["test_dpo_step_matches_reference"], always=True,
    ),
    # -- distillation_loss ---------------------------------------------------------------------------
    Mutant(
        name="kl_div_probabilities",
        why="Passes probabilities to F.kl_div, which expects log-probabilities as its input.",
        patches=[('soft = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")',
                  'soft = F.kl_div(log_p_student.exp(), log_p_teacher.exp(), reduction="batchmean")')],
        loses=["test_distillation_loss_matches_torch"], always=True,
    ),
    Mutant(
        name="kl_direction_swapped",
        why="F.kl_div(teacher, student) computes KL(student || teacher), the reverse KL.",
        patches=[('soft = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")',
                  'soft = F.kl_div(log_p_teacher, log_p_student, log_target=True, reduction="batchmean")')],
        loses=["test_distillation_loss_matches_torch"], always=True,
    ),
    Mutant(
        name="kl_reduction_mean",
        why='reduction="mean" divides by rows times classes, not by the rows. (Written as the sum divided by '
            'rows x classes, which is what reduction="mean" computes, without its deprecation warning.)',
        patches=[('soft = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")',
                  'soft = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum") / log_p_student.numel()')],
        loses=["test_distillation_loss_matches_torch"], always=True,
    ),
    Mutant(
        name="kl_batchmean_per_sequence",
        why="batchmean on the (B, L, V) logits: the soft term is divided by the number of sequences, "
            "not by the kept tokens.",
        patches=[('soft = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")',
                  'soft = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum") / student_logits.shape[0]')],
        loses=["test_distillation_loss_per_token"], always=True,
    ),
    Mutant(
        name="missing_t_squared",
        why="Leaves out the T^2 factor of the soft term.",
        patches=[(' * temperature ** 2\n    hard', '\n    hard')],
        loses=["test_distillation_loss_matches_torch"], always=True,
    ),
    Mutant(
        name="teacher_not_tempered",
        why="Divides only the student's logits by T.",
        patches=[("log_p_teacher = F.log_softmax(teacher_rows / temperature, dim=-1)",
                  "log_p_teacher = F.log_softmax(teacher_rows, dim=-1)")],
        loses=["test_distillation_loss_matches_torch"], always=True,
    ),
    Mutant(
        name="teacher_not_frozen",
        why="Neither detaches the teacher's logits in the loss nor runs the teacher under torch.no_grad(): "
            "gradients reach the teacher.",
        patches=[("teacher_rows = teacher_logits.detach()[keep]", "teacher_rows = teacher_logits[keep]"),
                 ("    with torch.no_grad():\n        teacher_logits = ", "    if True:\n        teacher_logits = ")],
        loses=["test_distillation_loss_gradients_teacher_constant", "test_distill_step_teacher_frozen"], always=True,
    ),
    Mutant(
        name="teacher_train_mode",
        why="Never puts the teacher in eval mode: its dropout stays on.",
        patches=[("    teacher.eval()\n    with torch.no_grad():", "    with torch.no_grad():")],
        loses=["test_distill_step_matches_reference", "test_distill_step_teacher_frozen"], always=True,
    ),
]
