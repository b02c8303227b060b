module mtrace.dev/demo

go 1.22
