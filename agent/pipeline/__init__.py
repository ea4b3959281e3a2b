"""The tick: stage calls in order, export selection, the immutable snapshot."""
