from loom.entry import main

main()
