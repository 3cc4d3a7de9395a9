"""Several nodes on one Redis: live delivery through Redis pub/sub, cluster-wide
presence and the node's health (``node``).  See docs/cluster.md."""

from tidings.cluster.node import Cluster, ClusterStatistics, ClusterUnavailable, open_cluster

__all__ = ["Cluster", "ClusterStatistics", "ClusterUnavailable", "open_cluster"]
