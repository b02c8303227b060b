module mtrace.test/programs

go 1.22
