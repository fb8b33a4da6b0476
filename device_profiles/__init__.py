"""Built-in device profiles (YAML), shipped as package data; read by ``edgepack.runtime.profiles``."""
