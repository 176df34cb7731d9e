"""pyserial URL handlers of the project (`serial.protocol_handler_packages`)."""
