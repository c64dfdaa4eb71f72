"""Obstacle sets: embeddings of what the sampler must avoid, indexed with FAISS, saved safely."""

from obstacles.obstacle_set import FORMAT, FORMAT_VERSION, ObstacleSet, ObstacleSetError

__all__ = ["FORMAT", "FORMAT_VERSION", "ObstacleSet", "ObstacleSetError"]
