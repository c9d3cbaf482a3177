"""Instances of the GMRL core (`gmrl.core.MetaProblem`) beyond the tabular MAML/LIRPG problems of
`gmrl.metagrad`: LOLA on the iterated prisoner's dilemma (`gmrl.problems.lola`)."""
