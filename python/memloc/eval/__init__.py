"""Evaluation: Carlini et al.'s extraction attack, memorization and quality metrics, Wen et al.'s mitigation."""

from .attack import AttackConfig, analyze_prompt, attack_pipeline
from .cliques import clique_medoid, has_clique, max_clique
from .compare import EvalConfig, Metrics, evaluate_method
from .detection import detection_metric
from .mitigation import mitigate_embeddings
from .tiled_l2 import PAPER_THRESHOLD, tiled_l2

__all__ = [
    "AttackConfig",
    "EvalConfig",
    "Metrics",
    "PAPER_THRESHOLD",
    "analyze_prompt",
    "attack_pipeline",
    "clique_medoid",
    "detection_metric",
    "evaluate_method",
    "has_clique",
    "max_clique",
    "mitigate_embeddings",
    "tiled_l2",
]
