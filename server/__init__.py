"""A swarm peer that hosts a contiguous span of transformer blocks."""
