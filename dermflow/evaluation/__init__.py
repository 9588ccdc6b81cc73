"""Evaluation: inference, saliency, figures, the report, and promotion."""
