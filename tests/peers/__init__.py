"""Real third-party servers that tests start on 127.0.0.1, installed once per machine outside the clone."""
