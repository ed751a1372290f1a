"""What peers and clients of a corolla swarm must agree on: wire messages, DHT records, model anatomy."""
