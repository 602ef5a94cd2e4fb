fn main() {
    print!("{}", mailroom::api::crd::to_yaml().unwrap());
}
