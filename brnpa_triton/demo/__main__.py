from brnpa_triton.demo import main

main()
