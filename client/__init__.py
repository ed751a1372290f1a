"""The corolla client: keeps embeddings and the LM head, runs the blocks through the swarm."""
