from mtrace.cli.main import main

main()
