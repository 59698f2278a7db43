"""Deep Feature Factorization: the concepts a layer found in images, where and what they are."""

from heatlens.concepts.factorize import Concepts, factorize
from heatlens.concepts.nmf import Factorization, nmf

__all__ = ["Concepts", "Factorization", "factorize", "nmf"]
