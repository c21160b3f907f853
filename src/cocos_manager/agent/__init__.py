"""The Cocos agent: the manifest it is handed, the vsock transport, and its event/log stream protocol."""
