"""The corolla peer: serves a span of transformer blocks to the swarm."""
