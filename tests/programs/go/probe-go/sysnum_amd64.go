package main

// sendmmsg(2): Go's syscall package lists it for arm64 only.
const sysSendmmsg = 307
