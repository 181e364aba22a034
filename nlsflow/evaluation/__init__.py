"""Scoring models on test sets: generation, answer extraction under both protocols, accuracies."""
