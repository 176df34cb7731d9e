"""The local broker: the embedded amqtt broker, topics, RPC between the processes."""
