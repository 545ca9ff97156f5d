"""Stable codes for why a rewrite was refused: the sentence is for people, the code for programs.

``foldkit check`` decides a finding's code and severity from these codes, never from the words of
the sentence, so rewording a reason cannot turn an error into a warning (tests/test_check.py
checks that every code has a finding).
"""

from enum import Enum


class Why(str, Enum):
    NOT_APPLICABLE = "not_applicable"  # the pattern does not fit here (the reason says what is missing)
    TRAINING_MODE = "training_mode"  # the BN normalizes with batch statistics and cannot be converted
    INVALID_PARAMETERS = "invalid_parameters"  # NaN/Inf parameters, var + eps <= 0, channel counts that disagree
    OVERFLOW = "overflow"  # a folded value does not fit the tensor's dtype
    QUANTIZATION = "quantization"  # a quantized pattern that cannot be folded exactly


# Why -> (finding code, severity) in ``foldkit check``
FINDINGS = {
    Why.NOT_APPLICABLE: ("FK003", "warning"),
    Why.TRAINING_MODE: ("FK002", "error"),
    Why.INVALID_PARAMETERS: ("FK005", "error"),
    Why.OVERFLOW: ("FK004", "warning"),
    Why.QUANTIZATION: ("FK003", "warning"),
}

# when a BN was refused by several passes, the code the report keeps: the most serious one
PRIORITY = (Why.TRAINING_MODE, Why.INVALID_PARAMETERS, Why.OVERFLOW, Why.QUANTIZATION, Why.NOT_APPLICABLE)
