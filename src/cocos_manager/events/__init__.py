"""Events and console history: the bus (numbering, retention, replay, fan-out), subscriptions, the manager's own messages, each VM's console."""
