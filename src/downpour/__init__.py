"""downpour: Downpour SGD through a sharded parameter server, for unsupervised feature learning.

The 2012 Google "cat" system (Dean et al., NIPS 2012; Le et al., ICML 2012) rebuilt as software that runs from a
laptop to a cluster, with the staleness of every update measured.
"""

__version__ = "0.1.0"
