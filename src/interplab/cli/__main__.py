from interplab.cli import main

main()
