from aotlm.cli import main

main()
