"""Plausible wrong implementations of lab 05 (fine-tuning BERT for sentiment classification).

The first eight (always=True) are graded on every test run; the others are further mistakes students make,
each aimed at one part of the contract so that every group of hidden tests is shown to have teeth.
"""
from mutants.mutation import Mutant

MUTANTS = [
    # -- always graded ------------------------------------------------------------------------
    Mutant(
        name="mean_pool_over_padding",
        why="Mean pooling averages every position, padding included (hidden_states.mean(dim=1)), so a "
            "sentence's vector depends on the other sentences of its batch.",
        patches=[("    return summed / counts\n", "    return hidden_states.mean(dim=-2)\n")],
        loses=["test_mean_pool_matches_formula", "test_mean_pool_all_padding_row", "test_mean_pool_gradients",
               "test_classifier_logits", "test_classifier_gradients"], always=True,
    ),
    Mutant(
        name="cls_wrong_index",
        why="The [CLS] vector taken from the last position (hidden[:, -1], GPT-style) instead of position 0; "
            "with right padding that is usually a [PAD] token.",
        patches=[("pooled = hidden[:, 0]", "pooled = hidden[:, -1]")],
        loses=["test_classifier_logits", "test_classifier_gradients", "test_classifier_dropout_in_train_mode"], always=True,
    ),
    Mutant(
        name="train_forgets_model_train",
        why="train_one_epoch never calls model.train(): after an evaluation the model trains with dropout off.",
        patches=[("    model.train()   # dropout on\n", "")],
        loses=["test_train_one_epoch_sets_train_mode"], always=True,
    ),
    Mutant(
        name="evaluate_forgets_model_eval",
        why="evaluate never calls model.eval(): dropout stays on, and the metrics are noisy.",
        patches=[("    model.eval()   # dropout off: the same input always gives the same prediction\n", "")],
        loses=["test_evaluate_uses_eval_mode"], always=True,
    ),
    Mutant(
        name="no_zero_grad",
        why="optimizer.step() without optimizer.zero_grad(): gradients accumulate over the epoch.",
        patches=[("        optimizer.zero_grad()\n", "")],
        loses=["test_train_one_epoch_matches_reference", "test_train_one_epoch_steps_scheduler_per_batch"], always=True,
    ),
    Mutant(
        name="scheduler_per_epoch",
        why="scheduler.step() once per epoch instead of once per batch: with warm-up from 0 the learning "
            "rate stays 0 for the whole first epoch (the end-to-end run ends at chance, 0.50).",
        patches=[
            ("        if scheduler is not None:\n"
             "            scheduler.step()   # the schedule counts optimizer steps, so it moves every batch\n", ""),
            ("    if batches == 0:\n", "    if scheduler is not None:\n        scheduler.step()\n    if batches == 0:\n"),
        ],
        loses=["test_train_one_epoch_matches_reference", "test_train_one_epoch_steps_scheduler_per_batch",
               "test_end_to_end_finetuning"], always=True,
    ),
    Mutant(
        name="f1_of_negative_class",
        why="F1 computed for class 0 (2 TN / (2 TN + FP + FN)) instead of the positive class 1.",
        patches=[
            ("f1_denominator = 2 * tp + fp + fn", "f1_denominator = 2 * tn + fp + fn"),
            ('"f1": 2 * tp / f1_denominator', '"f1": 2 * tn / f1_denominator'),
        ],
        loses=["test_evaluate_matches_sklearn", "test_evaluate_f1_undefined"], always=True,
    ),
    Mutant(
        name="confusion_matrix_transposed",
        why="Confusion matrix with rows = prediction and columns = truth (the transpose of scikit-learn's).",
        patches=[('"confusion_matrix": [[tn, fp], [fn, tp]]', '"confusion_matrix": [[tn, fn], [fp, tp]]')],
        loses=["test_evaluate_matches_sklearn"], always=True,
    ),
    # -- further mistakes -----------------------------------------------------------------------
    Mutant(
        name="pad_to_max_length",
        why="Every batch padded to max_length instead of to its longest sentence.",
        patches=[('padding="longest",', 'padding="max_length",')],
        loses=["test_tokenize_batch_pads_like_tokenizer"],
    ),
    Mutant(
        name="no_truncation",
        why="Sentences longer than max_length are not truncated.",
        patches=[("truncation=True,", "truncation=False,")],
        loses=["test_tokenize_batch_truncates"],
    ),
    Mutant(
        name="mean_pool_divides_by_zero",
        why="The token count is not guarded, so a row of padding only gives 0/0 = NaN.",
        patches=[("counts = keep.sum(dim=-2).clamp(min=1).to(hidden_states.dtype)",
                  "counts = keep.sum(dim=-2).to(hidden_states.dtype)")],
        loses=["test_mean_pool_all_padding_row"],
    ),
    Mutant(
        name="encoder_detached",
        why="The encoder's output is detached (a frozen encoder): only the head learns, and the "
            "end-to-end run stays well under the threshold ([CLS] pooling: 0.48-0.63 over four seeds, against "
            "0.77-0.79 for the reference).",
        patches=[("hidden = self.encoder(**inputs).last_hidden_state",
                  "hidden = self.encoder(**inputs).last_hidden_state.detach()")],
        loses=["test_classifier_gradients", "test_end_to_end_finetuning"],
    ),
    Mutant(
        name="token_type_ids_ignored",
        why="token_type_ids are never passed to the encoder, so the second segment of a pair is read as the first.",
        patches=[('            inputs["token_type_ids"] = token_type_ids\n', "            pass\n")],
        loses=["test_classifier_logits", "test_classifier_gradients"],
    ),
    Mutant(
        name="clip_by_value",
        why="Gradients clipped element by element (clip_grad_value_) instead of by their global norm.",
        patches=[("torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)",
                  "torch.nn.utils.clip_grad_value_(model.parameters(), max_grad_norm)")],
        loses=["test_train_one_epoch_clips_global_norm"],
    ),
    Mutant(
        name="evaluate_mean_of_batch_means",
        why="The evaluation loss averages the batch means, over-weighting a smaller last batch.",
        patches=[
            ('loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()',
             "loss_sum += F.cross_entropy(logits, labels).item()"),
            ('"loss": loss_sum / n,', '"loss": loss_sum / len(predictions),'),
        ],
        loses=["test_evaluate_matches_sklearn", "test_evaluate_uses_eval_mode"],
    ),
    Mutant(
        name="train_returns_last_loss",
        why="train_one_epoch returns the last batch's loss instead of the mean over the epoch.",
        patches=[("    return total / batches\n", "    return loss.item()\n")],
        loses=["test_train_one_epoch_matches_reference"],
    ),
]
