"""Evaluation: a checkpoint on the mesh (scoring), the lm-eval adapter (lm_eval_adapter, run with
`python -m meki_jax.eval`) and the logit lens (logit_lens). Nothing is imported here, so importing
one does not import lm-eval."""
